"""Live dials end when the policy that allowed them does: at its expiry, its deletion, or an update that narrows it.

Each dial a relay serves is kept under the id of the policy that allowed it.
When that policy changes (in this process, or in another through the store
watcher's ``status_changes`` rows, controller/watcher.py) and when its expiry
comes (a timer in every process: no message needs to travel for it), the
dials are decided again in a worker thread; those nothing allows any more
are reset with the reason, which their ``dial_closed`` audit row carries,
and those another policy allows move under it.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.blocking import RELAY_POOL
from controller.relay.broker import ServiceKey
from shared.protocol import ErrorCode
from shared.tunnel.channel import StreamChannel

if TYPE_CHECKING:
    from controller.context import ControllerContext
    from controller.relay.session import RelaySession

#: A timer fires this long after the expiry it waits for: the event loop's
#: clock and the wall clock may differ by a few milliseconds, and a dial
#: decided again a hair early would stay open until the next change.
EXPIRY_MARGIN_SECONDS = 0.05


@dataclass(eq=False)
class LiveDial:
    """One spliced dial: the dialer's tunnel and both of its streams."""

    session: RelaySession
    binder: RelaySession
    key: ServiceKey
    dialer: StreamChannel
    upstream: StreamChannel
    port: int | None = None


class PolicyWatch:
    """The live dials of this relay process by the policy that allowed them."""

    def __init__(self, context: ControllerContext, loop: asyncio.AbstractEventLoop | None) -> None:
        self.context = context
        self._loop = loop
        self._dials: dict[int, set[LiveDial]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        #: Policy changes announced so far: a dial decided before one and kept after it is decided again.
        self.changes = 0
        context.policy.on_changed(self.policy_changed)

    def add(self, policy_id: int, dial: LiveDial, changes_seen: int | None = None) -> None:
        """Keep ``dial`` under ``policy_id`` until ``remove``; time its end when the policy expires.

        ``changes_seen``: ``changes`` before the dial was decided. A change
        announced since (while the gateway accepted) found no dial to decide
        again; this one is decided again now.
        """
        self._dials.setdefault(policy_id, set()).add(dial)
        self._time(policy_id)
        if changes_seen is not None and changes_seen != self.changes:
            self.policy_changed(policy_id)

    def remove(self, dial: LiveDial) -> None:
        for policy_id in [p for p, dials in self._dials.items() if dial in dials]:
            self._dials[policy_id].discard(dial)
            if not self._dials[policy_id]:
                del self._dials[policy_id]
                timer = self._timers.pop(policy_id, None)
                if timer is not None:
                    timer.cancel()

    def count(self, policy_id: int) -> int:
        return len(self._dials.get(policy_id, ()))

    def _time(self, policy_id: int) -> None:
        loop = self._loop
        expires_at = self.context.policy.expiry_of(policy_id)
        if loop is None or expires_at is None:
            return
        when = loop.time() + max(0.0, expires_at - time.time()) + EXPIRY_MARGIN_SECONDS
        timer = self._timers.get(policy_id)
        if timer is not None:
            if abs(timer.when() - when) < EXPIRY_MARGIN_SECONDS:
                return
            timer.cancel()
        self._timers[policy_id] = loop.call_at(when, self._expired, policy_id)

    def _expired(self, policy_id: int) -> None:
        self._timers.pop(policy_id, None)
        self.policy_changed(policy_id)

    def policy_changed(self, policy_id: int) -> None:
        """Decide again every live dial ``policy_id`` allowed (from the event loop or a worker thread)."""
        self.changes += 1
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._recheck_soon(policy_id)
        else:
            loop.call_soon_threadsafe(self._recheck_soon, policy_id, context=contextvars.Context())

    def _recheck_soon(self, policy_id: int) -> None:
        dials = list(self._dials.get(policy_id, ()))
        if dials and self._loop is not None:
            # A fresh context: the closing rows carry their own correlation, not a management request's.
            self._loop.create_task(self._recheck(policy_id, dials), context=contextvars.Context())

    async def _recheck(self, policy_id: int, dials: list[LiveDial]) -> None:
        verdicts = await RELAY_POOL.run(self._decide_again, policy_id, dials)
        for dial, (allowed_by, reason) in zip(dials, verdicts, strict=True):
            if dial not in self._dials.get(policy_id, ()):
                continue  # ended meanwhile
            if allowed_by is None:
                self.remove(dial)
                for channel in (dial.dialer, dial.upstream):
                    channel.reset(ErrorCode.POLICY_DENIED, reason)
                await asyncio.gather(dial.session.flush(), dial.binder.flush(), return_exceptions=True)
            elif allowed_by != policy_id:
                self.remove(dial)
                self.add(allowed_by, dial)
            else:
                self._time(policy_id)  # updated, still allowing: its expiry may have moved

    def _decide_again(self, policy_id: int, dials: list[LiveDial]) -> list[tuple[int | None, str]]:
        """(the policy allowing it now or None, why it ends) for each dial (worker thread: reads the store)."""
        engine = self.context.policy
        now = time.time()
        why = engine.why_ended(policy_id, now)
        if "expired" in why:
            engine.record_expiries(now)
        verdicts: list[tuple[int | None, str]] = []
        for dial in dials:
            service = self.context.registry.get_service(*dial.key)
            if service is None:
                verdicts.append((None, f"{why}; the service {dial.key[0]}/{dial.key[1]} is gone"))
                continue
            decision = engine.explain("dial", dial.session.admitted, service, gateway=dial.binder.admitted,
                                      port=dial.port,
                                      session_certificate=dial.session.session_certificate).decision
            verdicts.append((decision.policy_id, "") if decision.allowed else (None, f"{why}; {decision.reason}"))
        return verdicts


def watch_for(context: ControllerContext, loop: asyncio.AbstractEventLoop | None) -> PolicyWatch | None:
    """A ``PolicyWatch`` when the context has a policy engine that announces changes (tests may give none)."""
    on_changed: Callable[..., object] | None = getattr(context.policy, "on_changed", None)
    return None if on_changed is None else PolicyWatch(context, loop)
