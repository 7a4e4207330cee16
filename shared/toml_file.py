"""A TOML file read whole, but never past a size bound: a wrong path (a disk image, a log) fails at once.

The callers say what went wrong in their own words (an agent's config, an
operator's outpostctl config): this module only tells the failures apart.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class FileTooLarge(ValueError):
    """The file holds more bytes than the bound its reader set."""


def load_toml_file(path: Path | str, limit: int) -> dict[str, Any]:
    """The TOML document at ``path``, of at most ``limit`` bytes (only ``limit`` + 1 are read).

    Raises what ``open`` raises (an ``OSError``), ``FileTooLarge``, ``UnicodeDecodeError``
    for bytes that are not UTF-8, or ``tomllib.TOMLDecodeError``.
    """
    with open(path, "rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise FileTooLarge(f"{path} is larger than {limit} bytes")
    return tomllib.loads(raw.decode("utf-8"))
