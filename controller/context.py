"""Everything one controller process shares: settings, store, CA, registry, policy, audit.

The relay (``controller/relay/``) is built against this object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.admin_credential import AdminCredential
from controller.audit import AuditLog
from controller.ca import CertificateAuthority
from controller.enrollment import Enrollment
from controller.policy import PolicyEngine
from controller.registry import Registry
from controller.renewal import Renewal
from controller.settings import Settings
from controller.store import Store
from controller.tokens import TokenAuthority


@dataclass
class ControllerContext:
    settings: Settings
    store: Store
    ca: CertificateAuthority
    registry: Registry
    policy: PolicyEngine
    audit: AuditLog
    tokens: TokenAuthority
    enrollment: Enrollment
    renewal: Renewal
    #: DER of the certificate the listener presents; tunnel signatures name it.
    server_certificate_der: bytes
    #: ``wss://HOST:PORT/v1/tunnel`` URLs handed to enrolling agents.
    relay_urls: list[str] = field(default_factory=list)
    #: (URL, tunnels) of every live relay, the least loaded first, refreshed by heartbeat (controller/relays.py).
    relay_loads: list[tuple[str, int]] = field(default_factory=list)
    #: The management API credential's hash (compared in constant time; the plaintext is not here).
    admin: AdminCredential | None = field(default=None, repr=False)
    #: DER of the listener certificate replaced by the last renewal: a tunnel whose TLS handshake
    #: came just before the swap signs over that one.
    previous_server_certificate_der: bytes | None = None
    #: Told the DER of each renewed listener certificate (on the event loop): the relay presents it on its tunnels.
    certificate_listeners: list[Callable[[bytes], None]] = field(default_factory=list, repr=False)
    #: People's sign-in (controller/signin/service.py ``SigninService``), made with the app.
    signin: Any = field(default=None, repr=False)

    def close(self) -> None:
        self.store.close()
