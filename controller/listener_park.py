"""Connections held at accept, before their TLS handshake, while the relay behind the listener is full.

A relay at its admission cap (controller/relay/pacing.py, ``MAX_ADMITTING``)
used to refuse each new tunnel after paying for its TLS handshake: a
GOAWAY(BUSY) with a come-back time, and the agent paid a handshake too. In a
reconnect storm those refusals were most of the extra work on both sides, and
they came when the relay had the least CPU to spare. Held here instead, an
accepted connection costs a socket and a few bytes until the relay has room;
then its handshake starts, oldest first. One held past ``park_limit`` starts
its handshake anyway, and a relay still full tells it when to come back, as
before, so no agent waits here long. Held connections stay counted against
the listener's unauthenticated caps (controller/admission.py): holding them
is bounded as handshakes in flight are.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable

#: How long an accepted connection is held at most before its handshake starts anyway. The agent gives
#: TCP and TLS together 30 s (agent/tunnel/client.py, CONNECT_TIMEOUT); the handshake that follows the
#: hold has up to the listener's 10 s deadline, and 5 s are left for the round trips of a satellite or
#: congested cellular link. A relay admitting even 50 a second takes the cap's worth ahead of a held
#: connection three times over meanwhile.
PARK_LIMIT = 15.0
#: How often held connections are looked at while any are held: a relay under a storm finishes a few
#: admissions per 10 ms, so room is not left unused for longer than that.
PARK_POLL = 0.01


class Parking:
    """Accepted sockets waiting, in order, for ``full()`` to turn false; ``start`` begins a handshake."""

    def __init__(self, full: Callable[[], bool], start: Callable[[socket.socket, str], None],
                 drop: Callable[[socket.socket, str], None], limit: float = PARK_LIMIT) -> None:
        self.full = full
        self._start = start
        self._drop = drop
        self.limit = limit
        self._held: collections.deque[tuple[socket.socket, str, float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        #: Connections ever held (metrics and tests).
        self.held_total = 0

    def __len__(self) -> int:
        return len(self._held)

    def admit_or_hold(self, conn: socket.socket, address: str) -> None:
        """Start ``conn``'s handshake now if there is room and nobody is waiting ahead of it, else hold it."""
        if not self._held and (self.limit <= 0 or not self.full()):
            self._start(conn, address)
            return
        loop = asyncio.get_running_loop()
        self._held.append((conn, address, loop.time()))
        self.held_total += 1
        if self._timer is None:
            self._timer = loop.call_later(PARK_POLL, self._release)

    def _release(self) -> None:
        self._timer = None
        held = self._held
        now = asyncio.get_running_loop().time()
        while held and (not self.full() or now - held[0][2] >= self.limit):
            conn, address, _ = held.popleft()
            self._start(conn, address)
        if held:
            self._timer = asyncio.get_running_loop().call_later(PARK_POLL, self._release)

    def close(self) -> None:
        """Drop every held connection (the listener is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._held:
            conn, address, _ = self._held.popleft()
            self._drop(conn, address)
