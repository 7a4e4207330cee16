"""When to tell an agent to come back: come-back times paced by the relay's measured admission rate.

A relay past its admission capacity refuses a new tunnel before it pays for
its admission, and a stopping relay closes every tunnel; either way each
agent is told a time to come back (GOAWAY's retry_after on TLS, a 503's
Retry-After on the WebSocket). The times are handed out as slots, one every
1/rate seconds after the backlog in flight has drained, so a fleet told at
once returns at the pace this relay admits instead of all in the same second.
The agent adds its own jitter (agent/tunnel/backoff.py). ``now`` is passed
in (loop time): no clock of its own.
"""

from __future__ import annotations

from collections import deque

#: Tunnels between their upgrade (or TLS handshake) and the answer to their AUTH, at most: past it a
#: new tunnel is told to come back later (GOAWAY BUSY with a come-back time on TLS, 503 with
#: Retry-After on the WebSocket) before it costs a protocol core, a WebSocket and an admission.
#: Most of them wait on their peers, not on this process: a TLS round trip and the AUTH's (600 ms
#: each on a satellite link), an agent's TPM signature (50-200 ms), a load process behind on its own
#: work. 256 capped a fleet at 256 per such wait: 10,000 reconnecting after a restart under
#: tests/bench/fleet_scale.py were all back in 72 s with 2,226 refused attempts while this process
#: idled; with 1,024, in 45 s with none. Bounded still by CPU: an admission costs 1.2-3.5 ms
#: (tests/bench/fleet_scale.py; the last on a slow, shared 2-core machine), so 1,024 all ready at
#: once are answered within 3.6 s of a core, inside the 10 s AUTH and handshake deadlines. It
#: matches the listener's cap on handshakes in progress (controller/admission.py).
#: ``Settings.max_admitting`` overrides it (tests lower it).
MAX_ADMITTING = 1024

#: The pace before this process measured its own: ~60 % of what one relay admitted at its peak on a
#: 2-core machine under a storm (566-1,071 a second, tests/bench/fleet_scale.py), so the told agents
#: find room when they return even while the machine does other work.
DEFAULT_ADMISSIONS_PER_SECOND = 400.0
#: Never slower than this: a relay measured while its machine was starved must not send its fleet
#: hours away; 50 a second brings 10,000 back in under four minutes.
MIN_ADMISSIONS_PER_SECOND = 50.0
#: Never faster than this, whatever a burst measured: slots closer than 0.5 ms would bunch the
#: returns faster than one Python process can verify signatures.
MAX_ADMISSIONS_PER_SECOND = 2000.0
#: The window the admission rate is measured over: long enough to average a burst's
#: scheduling noise, short enough to follow a machine that got busier (or freer).
RATE_WINDOW = 5.0
#: Admissions a window must hold before its rate replaces the default: fewer say nothing of capacity.
RATE_MIN_SAMPLES = 100
#: Told agents get this share of the capacity measured: the rest is room for the tunnels that were
#: never told (a first connection, a gateway whose link flapped).
PACED_SHARE = 0.9
#: The first come-back time is at least this far: the backlog in flight must drain first.
FIRST_RETRY = 1.0
#: At a graceful stop the first slot is this far: a relay restarted by its service manager listens
#: again within a few seconds (its stop, then its start: 3-4 s measured under fleet_scale), and an
#: agent that comes back before would only find it closed.
STOP_FIRST_RETRY = 5.0


class ComeBackPacer:
    """Hands out come-back times, one slot every 1/rate seconds; the rate is this relay's measured capacity.

    Capacity is what it admitted while it was refusing (at its cap, admissions are as fast as it
    can go), over the last RATE_WINDOW: not its peak, which a quiet start may have set low or a
    freer machine high, and not its rate while under the cap, which is only what arrived.
    """

    def __init__(self, default_rate: float = DEFAULT_ADMISSIONS_PER_SECOND) -> None:
        self.default_rate = default_rate
        self._admitted: deque[float] = deque()
        #: The capacity last measured at the cap (admissions a second), None before.
        self._capacity: float | None = None
        #: The last slot handed out (loop time).
        self._until = 0.0
        self.told = 0

    def admitted(self, now: float) -> None:
        """One tunnel was admitted at ``now``."""
        window = self._admitted
        window.append(now)
        while window[0] < now - RATE_WINDOW:
            window.popleft()

    def _measure(self, now: float) -> None:
        """At the cap: what was admitted over the last window (or since the first admission) is the capacity."""
        window = self._admitted
        while window and window[0] < now - RATE_WINDOW:
            window.popleft()
        if len(window) >= RATE_MIN_SAMPLES:
            self._capacity = len(window) / max(now - window[0], RATE_WINDOW / 5)

    def rate(self) -> float:
        """Come-backs per second: a share of the capacity measured, else the default."""
        measured = self._capacity * PACED_SHARE if self._capacity is not None else self.default_rate
        return min(MAX_ADMISSIONS_PER_SECOND, max(MIN_ADMISSIONS_PER_SECOND, measured))

    def come_back(self, now: float, in_flight: int = 0) -> float:
        """Seconds from ``now`` after which one more refused agent gets its slot (the relay is at its cap).

        ``in_flight`` admissions already under way must drain first.
        """
        self._measure(now)
        rate = self.rate()
        start = now + max(FIRST_RETRY, in_flight / rate)
        self._until = max(self._until, start) + 1.0 / rate
        self.told += 1
        return self._until - now

    def follow(self, until: float) -> None:
        """Hand out no slot before ``until`` (loop time): the slots up to it were told by the process before this one.

        A stopping relay tells its whole fleet times at its pace (``stop_times``); while those
        agents arrive, every slot is taken. A refused agent told a time among them would
        find the relay as full and be refused again, its backoff growing each time (the
        storm's long tail); after them it finds room.
        """
        self._until = max(self._until, until)

    def stop_times(self, count: int) -> list[float]:
        """Come-back times (seconds from now) for ``count`` tunnels closed by a graceful stop, spread at the rate."""
        rate = self.rate()
        return [STOP_FIRST_RETRY + index / rate for index in range(count)]
