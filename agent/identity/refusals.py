"""What the agent does when the controller refuses its identity, tunnel and renewal alike.

* revoked: final. The running agent stops with exit 77 and systemd leaves it
  stopped (``RestartPreventExitStatus=``); only a new identity helps.
* disabled: central ops may enable it again at any time, so the agent keeps
  running and asks again, but at most once per ``DISABLED_ASK_INTERVAL``,
  whichever part asks (the tunnel or the certificate keeper): both wait on
  one ``DisabledGate``.
* any other refusal (an unknown key, a bad request): exponential backoff with
  jitter whose floor grows too (``refusal_delay``), never once a second.

Each ask costs the controller a refused row in its audit; a fleet disabled in
one go must not turn into a flood of them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.errors import OutpostError

T = TypeVar("T")

#: Values of ``identity_status`` on an error that carries the controller's word on the identity.
REVOKED = "revoked"
DISABLED = "disabled"

#: A disabled gateway asks the controller at most this often (tunnel and
#: renewal together). Ten minutes: an ``enable`` takes effect within that
#: without a site visit, and a thousand disabled gateways cost the controller
#: under two refused requests a second.
DISABLED_ASK_INTERVAL = 600.0

#: The first retry after a refusal other than revoked or disabled waits
#: between half this and this; each further refusal doubles both. A refusal
#: is a decision, not a glitch: a minute gives ops time to act, and the
#: growing floor keeps a draw near zero from ever repeating.
REFUSAL_RETRY_BASE_SECONDS = 60.0
#: ... up to this bound: a refused gateway still asks about once an hour, so a
#: fixed controller (a restored store, a re-enabled key) is used within the hour.
REFUSAL_RETRY_MAX_SECONDS = 3600.0


def identity_status(error: BaseException) -> str | None:
    """``REVOKED`` or ``DISABLED`` when the controller said so of this identity, else None."""
    status = getattr(error, "identity_status", None)
    return status if status in (REVOKED, DISABLED) else None


def refusal_delay(refusals: int, rng: random.Random) -> float:
    """The wait after ``refusals`` (>= 1) refusals in a row: "equal jitter", between half the bound and the bound."""
    bound = min(REFUSAL_RETRY_MAX_SECONDS, REFUSAL_RETRY_BASE_SECONDS * 2 ** min(max(refusals - 1, 0), 30))
    return rng.uniform(bound / 2, bound)


class DisabledGate:
    """One schedule of asks for the identity, shared by everything that asks the controller.

    Every ask goes between ``turn()`` and ``finish()``, one at a time, so two
    askers never ask at once and the second learns from the first's answer.
    Once the controller said "disabled" (``finish(True)``) the next ``turn()``
    returns only when the interval has passed, whoever asks. Only an accepted
    ask (``finish(False)``) opens it: an answer that says nothing of the
    status (the network failed, or a refusal for another reason, such as an
    expired certificate the relay judges before the status: ``finish(None)``)
    starts the interval again while it is closed, so a disabled gateway asks
    once per interval whatever the answers. Times are on ``monotonic``: an
    interval, not a date, so a clock step must not move it.
    """

    def __init__(self, interval: float | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval = DISABLED_ASK_INTERVAL if interval is None else interval
        self._monotonic = monotonic
        #: when the next ask may go out (monotonic), or None when the identity is not known disabled
        self._until: float | None = None
        self._asking = False
        # Futures of the callers waiting in turn(), not an asyncio.Event: the agent's start-up
        # (recovery) and its main loop are separate event loops, and an Event binds to one.
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def closed(self) -> bool:
        """The controller's last word on the identity was "disabled"."""
        return self._until is not None

    def remaining(self) -> float:
        """Seconds until the next ask may go out (0 when the gate is open)."""
        return 0.0 if self._until is None else max(0.0, self._until - self._monotonic())

    async def turn(self) -> None:
        """Return when this caller may ask, and hold the turn until ``finish()``."""
        await self.wait()
        self._asking = True

    @property
    def ready(self) -> bool:
        """An ask may go out now: nobody is asking and no interval runs."""
        return not self._asking and self.remaining() <= 0

    async def wait(self) -> None:
        """Return when an ask may go out (without taking the turn)."""
        while not self.ready:
            await self.changed()

    async def changed(self) -> None:
        """Return at the next ``finish()``, or when the interval runs out, whichever comes first."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait({waiter}, timeout=None if self._asking or not self.closed else self.remaining())
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()

    def finish(self, disabled: bool | None) -> None:
        """End the turn: the controller said disabled (True), accepted (False), or nothing of the status (None)."""
        self._asking = False
        if disabled or (disabled is None and self.closed):
            self._until = self._monotonic() + self.interval
        elif disabled is not None:
            self._until = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def ask(self, request: Awaitable[T]) -> T:
        """Await ``request`` (one ask of the controller) in this gate's turn; its outcome decides the gate.

        Success is an acceptance; an error is "disabled" or says nothing of the status.
        """
        await self.turn()
        try:
            result = await request
        except OutpostError as error:
            self.finish(True if identity_status(error) == DISABLED else None)
            raise
        except BaseException:
            self.finish(None)
            raise
        self.finish(False)
        return result
