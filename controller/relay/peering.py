"""Dials across relays: the links between relay processes, both ends (``--role relay``, and the box in role all).

A dial arrives at relay A for a service no tunnel of A binds. A decides it
by policy as for any dial (audit "decided" once, at A), looks up which live
relay hosts the service (controller/relay/directory.py), and opens the
dial's stream on a link to that relay B (the first opened at the first such
dial, reused by later ones, another once those open carry their dials, reopened
after B comes back). B splices
the link's stream to the binder's, each with its own window, and records
serving it under A's correlation id. The ends of a link are in
controller/relay/link_client.py (A) and controller/relay/link_admit.py (B).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from controller.blocking import RELAY_POOL
from controller.correlation import TUNNEL, new_id
from controller.listener import LINK_DIALS, LINK_WRITE_STALL, MAX_LINKS_PER_PAIR
from controller.registry import Identity
from controller.relay.admit import AdmissionRefused, Admitted
from controller.relay.aiming import split_aim
from controller.relay.broker import ServiceKey
from controller.relay.directory import RemoteHost, ServiceDirectory
from controller.relay.link_admit import (
    LINK_FIELD,
    LinkPeer,
    admit_link,
    leaf_of,
    linked_relay,
    relay_name_of,
    split_peer,
    why_not_admitted,
)
from controller.relay.link_client import LinkFailed, LinkSession, RemoteBinder, link_tls_context, open_link
from controller.relay.link_trust import (
    CLOCK_STEP_NOTICED,
    ENDED,
    draining,
    link_trust,
    pair_of,
    peer_ended_reason,
    retire,
)
from controller.relay.records import label_of_uri, refuse
from controller.store import StoreUnavailable
from shared.protocol import AuthReceived, BindRequested, ErrorCode, Liveness
from shared.trust import verify_leaf_issued_by
from shared.tunnel.channel import ChannelReset, StreamChannel
from shared.tunnel.splice import splice_streams

if TYPE_CHECKING:
    from controller.context import ControllerContext
    from controller.relay.relay import Relay
    from controller.relay.session import RelaySession

log = logging.getLogger(__name__)

#: B answers a link's dial within this long: less than A's own wait for a binder (frames.BINDER_ACCEPT_TIMEOUT,
#: 20 s), so A's dialer reads B's reason rather than a timeout of its own.
LINK_BINDER_ACCEPT_TIMEOUT = 15.0
#: How often B reads the relays table again for the links it admitted: a relay retired, or its
#: certificate replaced or revoked, loses its links within this long (the store's own watch is for identities).
LINK_RECHECK_INTERVAL = 2.0
#: Why recent dials found no reachable relay, by correlation id, read once by the dial that failed; bounded
#: because a dial denied by policy never reads its entry.
MAX_REMEMBERED_FAILURES = 1024
#: B forgets a silent link after this many of the link's announced keepalives.
LINK_IDLE_KEEPALIVES = 3


def admit_gateway(admit: Callable[..., Admitted], context: ControllerContext, chain_pem: tuple[str, ...] | list[str],
                  signature: bytes, nonce: bytes, now: dt.datetime) -> Admitted:
    """``admit`` (controller/relay/admit.py), its refusal of a relay's certificate (never a client certificate)
    said as such (a worker thread). Judged only once admission refused: a gateway's costs nothing more.
    """
    try:
        return admit(context, chain_pem, signature, nonce, now)
    except AdmissionRefused:
        leaf = leaf_of(chain_pem)
        if (leaf is not None and verify_leaf_issued_by(leaf, context.ca.certificate)
                and relay_name_of(context, leaf) is not None):
            raise AdmissionRefused(ErrorCode.AUTH_FAILED, "a relay's certificate cannot act as a gateway; enroll "
                                   "the gateway with its own token (outpostctl identity create)") from None
        raise


async def on_auth(session: RelaySession, event: AuthReceived) -> bool:
    """Take a relay link's AUTH (True); False for any other AUTH, a gateway's."""
    if not event.info.get(LINK_FIELD):
        return False
    context = session.context
    peering = session.relay.peering
    if peering is None:
        await refuse(session, event, ErrorCode.AUTH_FAILED, "this process takes no relay links; relays link "
                     "to relays and to a controller in role all")
        return True
    try:
        peer = await session.in_worker(admit_link, context, event.chain, event.signature, session.nonce,
                                       dt.datetime.now(dt.UTC))
    except AdmissionRefused as refused:
        await refuse(session, event, refused.code, refused.reason)
        return True
    except StoreUnavailable as unavailable:
        if not session.conn.closed:
            session.conn.close(ErrorCode.SERVICE_UNAVAILABLE, unavailable.message)
        return True
    if not session.conn.closed:
        peering.admitted(session, peer, event.info.get("keepalive"))
    return True


class Peering:
    """This relay's links: those it opened to other relays, those others opened to it, and its directory."""

    def __init__(self, relay: Relay, name: str, cert_path: Path | None = None, key_path: Path | None = None) -> None:
        self.relay = relay
        self.context = relay.context
        self.name = name
        #: The relay certificate and key this relay's links present: its listener's for a relay of its own,
        #: the box's own relay pair in role all (controller/box_relay.py).
        self.cert_path = cert_path or self.context.settings.server_cert_path
        self.key_path = key_path or self.context.settings.server_key_path
        self.directory = ServiceDirectory(self.context.store, name, relay.broker)
        #: Links this relay opened, by the other relay's name: dials multiplexed on the first, another
        #: link when those open carry link_dials each, up to links_per_pair.
        self.links: dict[str, list[LinkSession]] = {}
        self._opening: dict[str, asyncio.Task[LinkSession]] = {}
        #: Links other relays opened here, and who admission proved each to be.
        self.incoming: dict[RelaySession, LinkPeer] = {}
        self._failures: collections.OrderedDict[str, str] = collections.OrderedDict()
        #: B: when each admitted link's dialer certificate ends, a timer that closes it then.
        self._ends: dict[RelaySession, asyncio.TimerHandle] = {}
        #: A: per relay linked to, the pair of certificates its links last drained on and how many did
        #: (one entry per relay: bounded by the relays table).
        self._drains: dict[str, tuple[bytes, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.links_opened = 0
        limits = getattr(self.context.settings, "limits", None)
        #: LINK_WRITE_STALL, or what the settings' limits say (tests shorten it).
        self.write_stall = LINK_WRITE_STALL if limits is None else limits.link_write_stall
        self.link_dials = LINK_DIALS if limits is None else limits.link_dials
        self.links_per_pair = MAX_LINKS_PER_PAIR if limits is None else limits.links_per_pair

    # -- B: links admitted here ----------------------------------------------------
    def admitted(self, session: RelaySession, peer: LinkPeer, keepalive: object) -> None:
        relay = self.relay
        session.link_from = peer.name
        relay.authenticated(session)
        self.incoming[session] = peer
        if isinstance(keepalive, (int, float)) and not isinstance(keepalive, bool) and keepalive > 0:
            idle = LINK_IDLE_KEEPALIVES * float(keepalive)
            session.conn.set_liveness(Liveness(keepalive_interval=None, idle_timeout=idle))
        session.conn.mark_relay_link()
        session.conn.accept_auth({"relay": self.name, "time": time.time()})
        relay.record_soon("link_connected", relay=self.name, peer=peer.name, serial=peer.serial,
                          remote=session.remote, correlation=session.tunnel_id)
        self._close_at_end(session, peer)

    def _close_at_end(self, session: RelaySession, peer: LinkPeer) -> None:
        """Close the link when the certificate its dialer was admitted with ends (by the wall clock: the
        loop's timer is only the alarm)."""
        if session.conn.closed or session not in self.incoming:
            return
        left = peer.not_after - time.time()
        if left > 0:
            self._ends[session] = asyncio.get_running_loop().call_later(min(left, CLOCK_STEP_NOTICED),
                                                                        self._close_at_end, session, peer)
            return
        self._ends.pop(session, None)
        reason = peer_ended_reason(peer.name, peer.not_after)
        log.warning("link from %s closed: %s", peer.name, reason)
        session.spawn(session.close(ENDED, reason))

    def link_closed(self, session: RelaySession, reason: str) -> None:
        end = self._ends.pop(session, None)
        if end is not None:
            end.cancel()
        peer = self.incoming.pop(session, None)
        if peer is not None:
            self.relay.record_soon("link_closed", relay=self.name, peer=peer.name, reason=reason,
                                   correlation=session.tunnel_id)

    def refuse_bind(self, session: RelaySession, event: BindRequested) -> None:
        reason = "a relay link may not bind services; only gateways bind"
        session.conn.send_bind_result([], {name: reason for name in event.services})
        self._refused(session, reason, session.tunnel_id)

    def _refused(self, session: RelaySession, reason: str, correlation: str, **more: str | None) -> None:
        """One ``link_refused`` row, within the linking relay's budget (a flood of refused OPENs costs no more)."""
        self.relay.record_soon("link_refused", identity=f"_relay/{session.link_from}", relay=self.name,
                               peer=session.link_from, reason=reason, correlation=correlation, **more)

    async def serve_link_stream(self, session: RelaySession, channel: StreamChannel) -> None:
        """One dial A decided, to a gateway bound here: spliced to the binder's stream, or reset saying why."""
        parsed = split_peer(channel.peer)
        key, gateway, port = split_aim(channel.service, "")
        if parsed is None or gateway is None or not key[0]:
            reason = "a relay link's stream names TENANT/SERVICE@GATEWAY and carries the dialer and the dial's id"
            channel.reset(ErrorCode.PROTOCOL_ERROR, reason)
            self._refused(session, reason, session.tunnel_id)
            return
        dialer, correlation = parsed
        fields = {"correlation": correlation, "identity": label_of_uri(dialer), "service": f"{key[0]}/{key[1]}",
                  "relay": self.name, "link": session.link_from}
        binder = next((b for b in reversed(self.relay.broker.binders(key)) if not b.conn.closed
                       and b.identity is not None and b.identity.name == gateway and b.identity.tenant == key[0]),
                      None)
        if binder is None:
            reason = f"service {key[0]}/{key[1]} is not bound by gateway {gateway} at relay {self.name}"
            channel.reset(ErrorCode.SERVICE_UNAVAILABLE, reason)
            self._refused(session, reason, correlation, dialer=fields["identity"], service=fields["service"])
            return
        name = key[1] if port is None else f"{key[1]}:{port}"
        upstream = binder.open_stream(name, peer=dialer)
        try:
            await asyncio.wait_for(upstream.wait_accepted(), LINK_BINDER_ACCEPT_TIMEOUT)
        except ChannelReset as exc:
            channel.reset(exc.code, exc.reason)
            self.relay.record_soon("dial_failed", reason=exc.reason or exc.code.name, **fields)
            return
        except TimeoutError:
            reason = f"the gateway hosting {key[0]}/{key[1]} did not answer in time"
            upstream.reset(ErrorCode.TIMEOUT, "dial timed out")
            channel.reset(ErrorCode.TIMEOUT, reason)
            self.relay.record_soon("dial_failed", reason=reason, **fields)
            return
        if channel.error is not None or session.conn.closed:
            upstream.reset(ErrorCode.CANCEL, "the dialer went away")
            return
        session.conn.accept_stream(channel.stream_id)
        self.relay.record_soon("dial_served", gateway=binder.admitted.label, gateway_tunnel=binder.tunnel_id,
                               **fields)
        await session.flush()
        try:
            await splice_streams(channel, upstream)
        except ChannelReset:
            pass  # A records how the dial ended

    def _close_stalled(self) -> None:
        """Close the links whose relay took nothing of what this one wrote for ``write_stall`` seconds."""
        now = asyncio.get_running_loop().time()
        for session, peer in list(self.incoming.items()):
            since = session.write_pending_since
            if since is not None and now - since > self.write_stall and not session.conn.closed:
                reason = f"relay {peer.name} read nothing of this link for {self.write_stall:g} s"
                log.warning("link from %s closed: %s", peer.name, reason)
                session.spawn(session.close(ErrorCode.TIMEOUT, reason))

    async def _recheck(self) -> None:
        """Close the links of relays retired, or whose certificate was replaced or revoked, since admission,
        at both ends, and those of relays that stopped reading."""
        while True:
            await asyncio.sleep(LINK_RECHECK_INTERVAL)
            self._close_stalled()
            incoming = list(self.incoming.items())
            outgoing = [(relay, link, link.peer) for relay, links in self.links.items() for link in links
                        if link.peer is not None and not link.conn.closed and link.close_reason is None]
            if not incoming and not outgoing:
                continue
            try:
                reasons = await RELAY_POOL.run(why_not_admitted, self.context,
                                               [peer for _, peer in incoming] + [peer for _, _, peer in outgoing])
            except StoreUnavailable:
                continue  # links carry on while the store is away, as tunnels do
            for (session, _), reason in zip(incoming, reasons[:len(incoming)], strict=True):
                if reason is not None and not session.conn.closed:
                    await session.close(ErrorCode.REVOKED, reason)
            # A's end: a process still answering on a relay's old key is no longer that relay.
            for (relay, link, peer), reason in zip(outgoing, reasons[len(incoming):], strict=True):
                if reason is None or link.conn.closed:
                    continue
                log.warning("link to relay %s closed: %s", relay, reason)
                self.relay.record_soon("link_closed", relay=self.name, peer=relay, serial=peer.serial,
                                       reason=reason, correlation=link.tunnel_id)
                await link.close(ErrorCode.REVOKED, reason)

    # -- A: links opened from here -------------------------------------------------
    async def remote_binders(self, session: RelaySession, requested: str, correlation: str) -> list[RemoteBinder]:
        """The gateways bound at other live relays for a dial no local tunnel serves, each on an open link."""
        key, gateway, _ = split_aim(requested, session.admitted.tenant)
        try:
            hosts, identities = await session.in_worker(self._lookup, key, gateway)
        except StoreUnavailable:
            return []
        binders: list[RemoteBinder] = []
        failures: list[str] = []
        for host in hosts:
            identity = identities.get(host.gateway)
            if identity is None:
                continue
            try:
                link = await self.link_to(host.relay, host.address)
            except LinkFailed as failed:
                failures.append(failed.reason)
                continue
            binders.append(RemoteBinder(link, identity, key, correlation))
        if not binders and failures:
            self._failures[correlation] = failures[0]
            while len(self._failures) > MAX_REMEMBERED_FAILURES:
                self._failures.popitem(last=False)
        return binders

    def _lookup(self, key: ServiceKey, gateway: str | None) -> tuple[list[RemoteHost], dict[str, Identity]]:
        hosts = [h for h in self.directory.hosts(key) if gateway is None or h.gateway == f"{key[0]}/{gateway}"]
        identities: dict[str, Identity] = {}
        for host in hosts:
            tenant, _, name = host.gateway.partition("/")
            found = self.context.registry.get_identity(tenant, name)
            if found is not None and found.status not in ("revoked", "disabled"):
                identities[host.gateway] = found
        return hosts, identities

    def failure_of(self, correlation: str) -> str | None:
        """Why the dial ``correlation`` reached no other relay, when a link failed (read once)."""
        return self._failures.pop(correlation, None)

    async def link_to(self, relay: str, address: str) -> LinkSession:
        """A link to ``relay`` with room for one more dial: an open one, else a new one, up to links_per_pair."""
        for _ in range(self.links_per_pair + 1):  # each turn sees one more link open, or refuses
            now = time.time()
            live = [link for link in self.links.get(relay, ()) if link.close_reason is None and not link.conn.closed
                    and not draining(link, now)]
            for link in live:
                if link.dials() < self.link_dials:
                    return link
            opening = self._opening.get(relay)
            if opening is None:
                if len(live) >= self.links_per_pair:
                    break
                opening = asyncio.get_running_loop().create_task(self._open(relay, address))
                self._opening[relay] = opening
                opening.add_done_callback(lambda _task: self._opening.pop(relay, None))
            link = await asyncio.shield(opening)
            if link.dials() < self.link_dials:
                return link
        raise LinkFailed(f"relay {self.name} carries {self.links_per_pair * self.link_dials} dials to relay {relay} "
                         f"at once, the most for one pair of relays ({self.links_per_pair} links of "
                         f"{self.link_dials}); try again when one ends")

    async def _open(self, relay: str, address: str) -> LinkSession:
        settings = self.context.settings
        try:
            cert, key, ca = await RELAY_POOL.run(lambda: (self.cert_path.read_text(encoding="ascii"),
                                                          self.key_path.read_bytes(),
                                                          settings.ca_cert_path.read_text(encoding="ascii")))
        except OSError as error:  # the box's relay certificate not yet issued (its store was away at start)
            raise LinkFailed(f"this relay has no relay certificate to link with yet ({error.strerror})") from None
        link, task = await open_link(relay, address, link_tls_context(ca), cert, key, new_id(TUNNEL))
        try:
            # Before any dial: the relay the directory named, on the key the store lists for it now.
            link.peer = await RELAY_POOL.run(linked_relay, self.context, relay, link.peer_certificate)
        except (AdmissionRefused, StoreUnavailable) as refused:
            reason = refused.reason if isinstance(refused, AdmissionRefused) else refused.message
            await link.close(ErrorCode.REVOKED, reason)
            await asyncio.gather(task, return_exceptions=True)
            raise LinkFailed(f"relay {relay} at {address} is not linked to: {reason}") from None
        self._trust(relay, link)
        self.links.setdefault(relay, []).append(link)
        self.links_opened += 1
        log.info("link to relay %s at %s open (%d to it)", relay, address, len(self.links[relay]))

        def ended(_task: asyncio.Task[None]) -> None:
            links = self.links.get(relay, [])
            if link in links:
                links.remove(link)
            if not links:
                self.links.pop(relay, None)
            _, reason, _ = link.close_reason or (ErrorCode.CANCEL, "closed", False)
            log.info("link to relay %s closed: %s", relay, reason)

        task.add_done_callback(ended)
        return link

    def _trust(self, relay: str, link: LinkSession) -> None:
        """Schedule the link's drain and end by both relays' certificates (controller/relay/link_trust.py)."""
        pair = pair_of(link.peer_certificate, link.own_certificate)
        drained_pair, count = self._drains.get(relay, (b"", 0))
        left_before = count if drained_pair == pair else 0
        trust = link_trust(relay, link.peer_certificate, link.own_certificate, time.time(),
                           secrets.SystemRandom().random(), left_before)
        link.trust = trust

        def drained() -> None:
            earlier, count = self._drains.get(relay, (b"", 0))
            self._drains[relay] = (trust.pair, count + 1 if earlier == trust.pair else 1)
            log.info("link to relay %s takes no new dials: %s", relay, trust.drain_reason)

        def closed(reason: str) -> None:
            self.relay.record_soon("link_closed", relay=self.name, peer=relay, serial=trust.serial, reason=reason,
                                   correlation=link.tunnel_id)

        link.spawn(retire(link, drained, closed))

    # -- both ----------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.directory.run()), loop.create_task(self._recheck())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        links = [link for pair in list(self.links.values()) for link in pair]
        await asyncio.gather(*(link.close(ErrorCode.NO_ERROR, "relay shutting down") for link in links),
                             return_exceptions=True)
        await self.directory.close()
