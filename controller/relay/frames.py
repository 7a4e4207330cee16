"""A tunnel's BIND and OPEN frames at the relay: decided by policy and audited, then bound or spliced."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from controller.relay.aiming import DialChoice, choose, split_aim
from controller.relay.broker import ServiceKey, service_key
from controller.relay.policy_watch import LiveDial
from controller.relay.records import DialRecord
from controller.store import StoreUnavailable
from shared.protocol import BindRequested, ErrorCode
from shared.tunnel.channel import ChannelReset, StreamChannel
from shared.tunnel.splice import splice_streams

if TYPE_CHECKING:
    from controller.relay.session import RelaySession

#: (allowed, reason, service key, deciding policy id) of one named service.
Decision = tuple[bool, str, ServiceKey, int | None]
# A dial waits this long for the binder gateway to connect its local service.
BINDER_ACCEPT_TIMEOUT = 20.0


async def on_bind_requested(session: RelaySession, event: BindRequested) -> None:
    """Bind each name policy allows this tunnel to host; answer with the bound and the refused."""
    if session.link_from is not None and session.relay.peering is not None:
        return session.relay.peering.refuse_bind(session, event)
    # The protocol core already refused a BIND past MAX_BIND_SERVICES names.
    held = session.relay.broker.keys_bound_by(session)
    try:
        decisions = await session.in_worker(decide_all, session, "bind", event.services, held)
    except StoreUnavailable as unavailable:
        # Closed rather than refused: the agent binds again when it reconnects, once the store answers.
        await session.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
        return
    if session.conn.closed:
        return
    bound: list[str] = []
    refused: dict[str, str] = {}
    for requested, (allowed, reason, key, _policy) in zip(event.services, decisions, strict=True):
        if allowed:
            session.relay.broker.bind(key, session)
            bound.append(requested)
        else:
            refused[requested] = reason
    session.conn.send_bind_result(bound, refused)


def decide_all(session: RelaySession, kind: str, requested: Sequence[str],
               held: frozenset[ServiceKey] = frozenset()) -> list[Decision]:
    """Decide every name (reads only), then audit them all in one transaction (worker thread).

    A bind this tunnel already holds and may keep changes nothing, so it
    is not recorded again: repeating an allowed BIND cannot grow the log.
    """
    decisions = [decide(session, kind, name) for name in requested]
    session.context.audit.record_many([
        (f"{kind}_{'allowed' if allowed else 'denied'}",
         {"identity": session.admitted.label, "service": f"{key[0]}/{key[1]}", "reason": reason,
          "correlation": session.tunnel_id, **({} if policy is None else {"policy": policy})})
        for allowed, reason, key, policy in decisions
        if not (allowed and key in held)
    ])
    return decisions


def decide_dial(session: RelaySession, record: DialRecord, candidates: list[RelaySession]) -> DialChoice:
    """Decide one dial, and the gateway serving it; record its request and decision (worker thread)."""
    choice = choose(session, record.requested, candidates)
    key = choice.key
    groups = [record.decided(choice.allowed, choice.reason, f"{key[0]}/{key[1]}", choice.policy)]
    grant = None if choice.policy is None else session.context.policy.grant_of(choice.policy)
    if choice.allowed and grant is not None:
        # The grant's story names each connection it allowed, under the grant's own correlation id.
        groups.append([("grant_used", {"correlation": grant, "connection": record.id, "policy": choice.policy,
                                       "identity": record.identity, "service": f"{key[0]}/{key[1]}"})])
    session.context.audit.record_groups(groups)
    return choice


def decide(session: RelaySession, kind: str, requested: str) -> Decision:
    """(allowed, reason, service key) for this identity and a named service."""
    key = service_key(requested, session.admitted.tenant)
    service = session.context.registry.get_service(*key)
    if service is None:
        return False, f"no service named {key[0]}/{key[1]}", key, None
    decision = session.context.policy.decide(kind, session.admitted, service,
                                             session_certificate=session.session_certificate)
    return decision.allowed, decision.reason, key, decision.policy_id


async def on_stream_opened(session: RelaySession, channel: StreamChannel) -> None:
    """A dial: decide it, choose the gateway serving it, and splice the two until either ends."""
    if session.link_from is not None and session.relay.peering is not None:
        return await session.relay.peering.serve_link_stream(session, channel)
    record = DialRecord(session, channel)
    candidates = session.relay.broker.binders(split_aim(channel.service, session.admitted.tenant)[0])
    if not candidates and session.relay.peering is not None:  # bound at another relay, if anywhere
        candidates = cast("list[RelaySession]", await session.relay.peering.remote_binders(
            session, channel.service, record.id))
    watch = session.relay.policy_watch
    changes_seen = None if watch is None else watch.changes
    try:
        choice = await session.in_worker(decide_dial, session, record, candidates)
    except StoreUnavailable as unavailable:
        channel.reset(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
        return
    key, policy = choice.key, choice.policy
    if channel.error is not None or session.conn.closed:
        if choice.allowed:
            session.relay.record_soon(*record.failed("the dialer went away"))
        return
    if not choice.allowed:
        channel.reset(choice.code, choice.reason)
        return
    binder = choice.binder
    if binder is None or binder.conn.closed:
        failure = None if session.relay.peering is None else session.relay.peering.failure_of(record.id)
        channel.reset(ErrorCode.SERVICE_UNAVAILABLE,
                      failure or choice.unavailable or f"no gateway hosting {key[0]}/{key[1]} is connected")
        session.relay.record_soon(*record.failed(channel.error.reason if channel.error else "no gateway"))
        return
    try:
        await serve_dial(session, channel, binder, key, record, policy, choice.port, changes_seen)
    except ChannelReset as exc:
        session.relay.record_soon(*record.failed(exc.reason or exc.code.name))


async def serve_dial(session: RelaySession, channel: StreamChannel, binder: RelaySession, key: ServiceKey,
                     record: DialRecord, policy: int | None = None, port: int | None = None,
                     changes_seen: int | None = None) -> None:
    """Open the dial's stream to ``binder`` and splice the two; a ChannelReset says why it failed."""
    # The binder resolves the name in its own tenant: send it the bare name
    # when tenants match, the qualified one otherwise.
    name = key[1] if binder.admitted.tenant == key[0] else f"{key[0]}/{key[1]}"
    if port is not None:
        name = f"{name}:{port}"  # the binder's [[bind]] maps each declared port to its own target
    upstream = binder.open_stream(name, peer=session.admitted.uri)
    try:
        await asyncio.wait_for(upstream.wait_accepted(), BINDER_ACCEPT_TIMEOUT)
    except ChannelReset as exc:
        channel.reset(exc.code, exc.reason)
        raise
    except TimeoutError:
        upstream.reset(ErrorCode.TIMEOUT, "dial timed out")
        reason = f"the gateway hosting {key[0]}/{key[1]} did not answer in time"
        channel.reset(ErrorCode.TIMEOUT, reason)
        raise ChannelReset(ErrorCode.TIMEOUT, reason) from None
    if channel.error is not None or session.conn.closed:
        upstream.reset(ErrorCode.CANCEL, "the dialer went away")
        raise ChannelReset(ErrorCode.CANCEL, "the dialer went away")
    session.conn.accept_stream(channel.stream_id)
    loop = asyncio.get_running_loop()
    session.relay.record_soon(*record.served(binder, loop.time()))
    await session.flush()
    # Kept under the policy that allowed it: its expiry, deletion or narrowing ends the dial.
    live = LiveDial(session, binder, key, channel, upstream, port)
    watch = session.relay.policy_watch
    if watch is not None and policy is not None:
        watch.add(policy, live, changes_seen)
    try:
        await splice_streams(channel, upstream)
    finally:
        if watch is not None:
            watch.remove(live)
        session.relay.record_soon(*record.closed(channel, upstream, loop.time()))
