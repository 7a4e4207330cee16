"""Where a field-enrollment token may lie, and the note of a refused one.

``run`` on an enrolled gateway looks at every start for a token left behind
(agent.enrollment.field retires it): these few names let it see that there
is none without loading the enrollment code, which an enrolled gateway
otherwise never runs again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: Where ``packaging/take-boot-token`` (root, before the agent starts) puts a
#: token it took from the boot partition; the agent may delete it there.
STATE_TOKEN_NAME = "enroll.token"
ETC_TOKEN = Path("/etc/outpost/enroll.token")
BOOT_TOKEN = Path("/boot/firmware/outpost-enroll.token")
#: The content hash and sentence of the last refused token, so a restart does
#: not offer the same dead file to the controller again.
REFUSED_NOTE = "enroll-refused.json"


def default_token_paths(state_dir: Path) -> tuple[Path, ...]:
    """The documented places, in the order they are tried."""
    return (Path(state_dir) / STATE_TOKEN_NAME, ETC_TOKEN, BOOT_TOKEN)


def token_paths(config: Any) -> tuple[Path, ...]:
    """The configured ``[enrollment] token_paths``, or the documented places."""
    return config.token_paths if config.token_paths is not None else default_token_paths(config.state_dir)


def anything_left(config: Any) -> bool:
    """Whether a token file or a refusal note is there for an enrolled gateway to tidy up."""
    return (any(path.exists() for path in token_paths(config))
            or os.path.lexists(Path(config.state_dir) / REFUSED_NOTE))
