"""A gateway's AUTH at the relay: admission in a worker, registration, ``tunnel_connected``, the second read."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from typing import TYPE_CHECKING

from controller.blocking import RELAY_POOL
from controller.relay import cert_push, peering, reports
from controller.relay.admit import AdmissionRefused, admit, admit_here
from controller.relay.records import refuse
from controller.relays import relays_for
from controller.store import StoreUnavailable
from shared.protocol import AuthReceived, ErrorCode, Liveness

if TYPE_CHECKING:
    from controller.relay.session import RelaySession

log = logging.getLogger(__name__)

# The relay never pings (the agent pays for keepalives and keeps the NAT
# mapping open); it forgets a tunnel that sent nothing for this long, well
# above the longest keepalive interval a link profile uses.
RELAY_IDLE_TIMEOUT = 1800.0
RELAY_LIVENESS = Liveness(keepalive_interval=None, idle_timeout=RELAY_IDLE_TIMEOUT)
# Once the agent says how often it pings, the relay forgets its tunnel after
# this many keepalive intervals of silence: two lost PINGs are tolerated, and a
# gateway whose carrier NAT black-holed the tunnel is dropped in minutes
# (freeing its binds) instead of half an hour.
RELAY_IDLE_KEEPALIVES = 3
# Never sooner than this: a test's seconds-long keepalive must not make a
# relay drop tunnels over a short stall.
RELAY_IDLE_MIN = 10.0


def relay_liveness_for(keepalive: object) -> Liveness:
    """The relay's timers for an agent announcing ``keepalive`` seconds in AUTH (anything else: the default)."""
    if isinstance(keepalive, bool) or not isinstance(keepalive, (int, float)) or not keepalive > 0:
        return RELAY_LIVENESS
    idle = min(RELAY_IDLE_TIMEOUT, max(RELAY_IDLE_MIN, RELAY_IDLE_KEEPALIVES * float(keepalive)))
    return Liveness(keepalive_interval=None, idle_timeout=idle)


async def on_auth(session: RelaySession, event: AuthReceived) -> None:
    """Admit the tunnel's AUTH and answer it, or refuse it with the reason the agent reads."""
    if await peering.on_auth(session, event):  # a link from another relay
        return
    relay = session.relay
    now = dt.datetime.now(dt.UTC)
    # Taken before admission reads the store: a change announced after it may have been missed.
    changes = relay.identity_changes
    cache = relay.admission_cache
    generation = cache.generation
    try:
        # A gateway seen before is admitted here, with no worker job and no store read (admit_cache.py).
        admitted = admit_here(session.context, cache, event.chain, event.signature, session.nonce, now)
        if admitted is None:
            read = await session.in_worker(peering.admit_gateway, functools.partial(admit, cache=cache),
                                           session.context, event.chain, event.signature, session.nonce, now)
            if not read.session_certificate:  # people's roles change at sign-in, unannounced
                cache.remember_identity(read.identity, generation)
            admitted = read
    except AdmissionRefused as refused:
        await refuse(session, event, refused.code, refused.reason)
        return
    except StoreUnavailable as unavailable:
        # Nothing to decide with: the agent comes back on its own backoff once the store answers.
        log.warning("tunnel from %s refused: the store is unavailable", session.remote)
        if not session.conn.closed:
            session.conn.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
        return
    if session.conn.closed:  # the AUTH deadline passed while the worker checked it
        return
    session.identity = identity = admitted.identity
    session.session_certificate = admitted.session_certificate
    session.conn.set_liveness(relay_liveness_for(event.info.get("keepalive")))
    relay.register(session)
    session.presence = reports.tunnel_up(session, event.info.get("keepalive"))
    # Which certificate opened the tunnel: after a renewal, new tunnels name the new one.
    serial = admitted.serial
    session.conn.accept_auth({
        "identity": identity.uri,
        "name": identity.name,
        "tenant": identity.tenant,
        "time": time.time(),
        "relays": relays_for(session.context, identity.uri),
        "reports": True,
    })
    # A TLS handshake that came before a renewal this tunnel then missed: present the current certificate.
    await cert_push.push_if_missed(session)
    try:
        async with session.worker_turn:
            # Queued, not a transaction of its own: under a reconnecting fleet one commit (an fsync)
            # per tunnel was half the relay's CPU per admission; queued rows share commits. This
            # tunnel's next jobs wait for it, so its rows stay in order.
            written = relay.audit_queue.put_and_wait("tunnel_connected", {
                "identity": identity.label, "remote": session.remote, "serial": serial,
                "correlation": session.tunnel_id, "relay": relay.name})
            # Only a revocation, disabling or re-enrollment announced since admission began can have
            # found this tunnel unregistered; without one, the store has nothing newer to say and the
            # second read (a worker job and a query per admission) is skipped.
            still = (await RELAY_POOL.run(confirm_admission, session)
                     if relay.identity_changes != changes else None)
            await asyncio.wrap_future(written)
    except StoreUnavailable as unavailable:  # admitted, but whether it was revoked meanwhile cannot be read
        await session.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
        return
    if still is not None:
        await session.close(ErrorCode.REVOKED, still)


def confirm_admission(session: RelaySession) -> str | None:
    """Read the identity again, once ``tunnel_connected`` is queued: None, or why the tunnel must close.

    Admission read the identity in a worker thread before this tunnel was
    registered; a revocation or re-enrollment the store watcher announced
    in that gap found no tunnel to close. Read after registering, the
    store shows every change the watcher will not announce to us.
    """
    identity = session.admitted
    now = session.context.registry.identity_by_uri(identity.uri)
    if now is None or now.status in ("revoked", "disabled"):
        return f"identity {identity.tenant}/{identity.name} was {now.status if now else 'deleted'}"
    if now.key_sha256 != identity.key_sha256:
        return f"the key of identity {identity.tenant}/{identity.name} was replaced by re-enrollment"
    return None
