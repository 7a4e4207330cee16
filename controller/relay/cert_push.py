"""A renewed relay certificate presented on the tunnels already up (RELAY_CERT, docs/protocol.md).

An agent leaves a tunnel before the relay certificate it checked at the
handshake ends (agent/tunnel/relay_trust.py). So that a healthy relay does not
cut its fleet every few hours, each renewal is pushed to every tunnel whose
agent said in AUTH that it understands it: the new certificate and the relay
key's signature over the tunnel's own CHALLENGE nonce. A revoked relay gets no
new certificate, so its gateways leave by the old one's end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.blocking import RELAY_POOL
from controller.listener import STALL_TOLERANCE, ListenerLimits
from shared.protocol import RELAY_CERT_FEATURE, relay_cert_message

if TYPE_CHECKING:
    from controller.relay.relay import Relay
    from controller.relay.session import RelaySession

log = logging.getLogger(__name__)

#: Tunnels signed for in one worker job: one ECDSA signature is ~25 us (10,000 took 0.24 s of CPU here),
#: so a job of 256 holds a worker under 10 ms and the admissions queued behind it wait no longer than
#: that (10,000 tunnels: 40 jobs).
PUSH_BATCH = 256


def missed_window(limits: ListenerLimits) -> float:
    """How long after a renewal a tunnel's CHALLENGE may still follow a TLS handshake on the old certificate.

    The listener picks its certificate when it accepts a connection; the relay sees the tunnel only after
    the TLS handshake (up to its deadline) and, on a WebSocket, the request head (up to its deadline, plus
    the stall tolerance a late head gets). A tunnel that starts within this after a renewal is pushed the
    current certificate at admission: without it, one whose handshake came first would trust the old
    certificate and leave before its end, a reconnect the renewal was meant to spare. One whose handshake
    saw the new certificate gets it again, which the agent ignores (agent/tunnel/client.py): the cost is
    one signature per tunnel admitted in this short window after a renewal, none otherwise.
    """
    return limits.handshake_deadline + limits.head_deadline + STALL_TOLERANCE


def generation_seen(relay: Relay, now: float) -> int:
    """The certificate generation a tunnel starting at loop time ``now`` is taken to have seen at its handshake."""
    if relay.renewed_at is not None and now - relay.renewed_at <= relay.missed_window:
        return relay.certificate_generation - 1  # maybe the old certificate: push_if_missed presents the current
    return relay.certificate_generation


def wants_push(session: RelaySession) -> bool:
    """An admitted gateway's tunnel whose agent said it understands RELAY_CERT (never a relay link)."""
    info = session.conn.peer_info or {}
    return (session.identity is not None and session.link_from is None and not session.conn.closed
            and session.conn.authenticated and info.get(RELAY_CERT_FEATURE) is True)


def _sign_all(key_path: Path, certificate_der: bytes, nonces: Sequence[bytes]) -> list[bytes]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} holds no EC key")
    digest = hashlib.sha256(certificate_der).digest()
    return [key.sign(relay_cert_message(nonce, digest), ec.ECDSA(hashes.SHA256())) for nonce in nonces]


async def push(relay: Relay, certificate_der: bytes, sessions: Sequence[RelaySession]) -> int:
    """Present ``certificate_der`` on each of ``sessions`` that wants it; returns how many got it."""
    key_path = relay.context.settings.server_key_path
    chosen = [s for s in sessions if wants_push(s)]
    pushed = 0
    for start in range(0, len(chosen), PUSH_BATCH):
        batch = chosen[start:start + PUSH_BATCH]
        try:
            signatures = await RELAY_POOL.run(_sign_all, key_path, certificate_der, [s.nonce for s in batch])
        except (OSError, ValueError) as error:
            log.error("cannot present the renewed certificate on the tunnels (%s); agents reconnect before the "
                      "old one ends", error)
            return pushed
        for session, signature in zip(batch, signatures, strict=True):
            if session.conn.closed:
                continue
            session.conn.send_relay_certificate(certificate_der, signature)
            session.schedule_flush()
            pushed += 1
    return pushed


def renewed(relay: Relay, certificate_der: bytes) -> None:
    """The listener's certificate was renewed (on the event loop): present it on every tunnel up."""
    relay.certificate_generation += 1
    relay.renewed_at = asyncio.get_running_loop().time()
    for earlier in list(relay.pushes):
        earlier.cancel()  # its certificate is replaced: an agent would refuse it after this one

    async def push_all() -> None:
        count = await push(relay, certificate_der, list(relay.sessions))
        log.info("presented the renewed certificate on %d tunnels", count)

    task = asyncio.get_running_loop().create_task(push_all())
    relay.pushes.add(task)
    task.add_done_callback(relay.pushes.discard)


async def push_if_missed(session: RelaySession) -> None:
    """A tunnel admitted after a renewal whose handshake came (or may have come) before it: it trusts the old
    certificate."""
    relay = session.relay
    if session.certificate_generation != relay.certificate_generation:
        await push(relay, relay.context.server_certificate_der, [session])
