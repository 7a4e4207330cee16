"""A userspace link emulator: an asyncio TCP proxy on 127.0.0.1 between agent and relay.

The kernel here has no netem, so the link's behaviour is applied to TCP
payload as it passes: each direction is a timed, order-preserving queue
(delay), fed through a serialiser (rate), paused by stall windows, and bounded
(a full bottleneck stops reading, so the sender feels backpressure as on a
real link). A new connection waits one round trip before its bytes move, as
TCP's handshake does. A connection idle longer than the NAT timeout is
black-holed: no RST, no FIN, and from then on everything is either swallowed
("discard") or left unread so the senders' writes block ("unread", as when no
ACK returns). Random resets abort both sockets with an RST.

Counts are TCP payload bytes as the sender handed them to the link (dropped
bytes included: a metered link bills what the modem sent); IP/TCP headers and
ACKs are extra (docs/links.md estimates them).
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from dataclasses import dataclass, field

from shared.tunnel.splice import reset_connection
from tests.linkemu.profiles import BLACKHOLE_MODES, LinkProfile

# Read size per socket read: one 64 KiB chunk costs ~26 ms at 20 Mbit/s, so
# per-chunk work is negligible and the queue's timing stays fine-grained.
READ_SIZE = 64 * 1024
# Without a rate limit the bytes "in flight" are bounded by this, so a delay
# emulation on loopback cannot buffer without bound.
UNLIMITED_RATE_BUFFER = 16 * 1024 * 1024
# No test opens more connections through one emulator than this; a runaway
# reconnect loop is cut off instead of exhausting file descriptors.
MAX_CONNECTIONS = 2000
# Random resets per emulator at most: a flaky profile stays bounded in a long run.
MAX_RESETS = 1000
# Connecting to the target is loopback: anything slower is a bug.
UPSTREAM_CONNECT_TIMEOUT = 5.0
# The kernel receive buffer of the emulator's sockets (Linux doubles it). Left
# to autotuning, loopback grows it to tens of MiB: a queue in front of the
# emulated bottleneck that no modem has, and room for a black-holed sender to
# write for seconds before it blocks. The emulated queue is queue_bytes.
KERNEL_RECEIVE_BUFFER = 128 * 1024
# tcpi_state of a connection both ends still hold (linux/tcp_states.h).
TCP_ESTABLISHED = 1


class StallSchedule:
    """When the whole link stops forwarding: periodic windows and seeded random ones."""

    def __init__(self, profile: LinkProfile, start: float) -> None:
        self.profile = profile
        self.start = start
        self._rng = random.Random(profile.seed * 7919 + 1)
        self._random: collections.deque[tuple[float, float]] = collections.deque()
        self._random_horizon = start

    def stalled_until(self, now: float) -> float | None:
        """End of the stall covering ``now``, or None when the link is up."""
        p = self.profile
        if p.stall_every and p.stall_for > 0:
            # The stall closes each period, so the first one begins after every - stall_for.
            phase = (now - self.start) % p.stall_every
            if phase >= p.stall_every - p.stall_for:
                return now + (p.stall_every - phase)
        if p.random_stall_mean_interval and p.random_stall_for > 0:
            while self._random_horizon <= now:
                begin = self._random_horizon + self._rng.expovariate(1.0 / p.random_stall_mean_interval)
                self._random.append((begin, begin + p.random_stall_for))
                self._random_horizon = begin + p.random_stall_for
            while self._random and self._random[0][1] <= now:
                self._random.popleft()
            if self._random and self._random[0][0] <= now:
                return self._random[0][1]
        return None


@dataclass
class LinkStats:
    """What crossed the link, both ways, since the emulator started."""

    up_bytes: int = 0          # agent -> relay
    down_bytes: int = 0        # relay -> agent
    up_writes: int = 0         # socket reads with data: one per small write when idle
    down_writes: int = 0
    dropped_bytes: int = 0     # swallowed by a black-holed NAT mapping
    connections: int = 0
    blackholed: int = 0
    resets: int = 0
    arrivals: list[float] = field(default_factory=list)   # time.monotonic() of each new connection

    def as_json(self) -> dict:
        data = dict(self.__dict__)
        data.pop("arrivals")
        return data


class _Pipe:
    """One direction of one connection."""

    def __init__(self, link: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 upward: bool) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.upward = upward
        profile = link.emulator.profile
        self.capacity = (int(profile.rate * profile.one_way_delay) + profile.queue_bytes
                         if profile.rate else UNLIMITED_RATE_BUFFER)
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.buffered = 0
        self.free_at = 0.0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def read_loop(self) -> None:
        emulator = self.link.emulator
        profile = emulator.profile
        stats = emulator.stats
        while True:
            while self.buffered >= self.capacity and not self.link.blackholed:
                self.has_room.clear()
                await self.has_room.wait()
            if self.link.unread:
                await self.link.parked.wait()  # never set: the task ends when the emulator closes
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = b""
            now = time.monotonic()
            if data:
                if self.upward:
                    stats.up_bytes += len(data)
                    stats.up_writes += 1
                else:
                    stats.down_bytes += len(data)
                    stats.down_writes += 1
            if self.link.check_nat(now) or self.link.blackholed:
                if data:
                    stats.dropped_bytes += len(data)
                    continue
                if self.link.unread:
                    continue  # an EOF into an unread mapping is not passed on either
                # A FIN into a dead mapping goes nowhere: close only our side of it.
                self.link.close_side(self.reader_side_writer())
                return
            self.link.last_activity = now
            if profile.rate:
                depart = max(now, self.free_at) + len(data) / profile.rate
                self.free_at = depart
            else:
                depart = now
            self.queue.append((depart + profile.one_way_delay, data or None))
            self.buffered += len(data)
            self.has_data.set()
            if not data:
                return

    def reader_side_writer(self) -> asyncio.StreamWriter:
        return self.link.client_writer if self.upward else self.link.upstream_writer

    async def write_loop(self) -> None:
        stalls = self.link.emulator.stalls
        while True:
            while not self.queue:
                if self.link.blackholed:
                    return
                self.has_data.clear()
                await self.has_data.wait()
            deliver_at, data = self.queue[0]
            while True:
                now = time.monotonic()
                if now < deliver_at:
                    await asyncio.sleep(deliver_at - now)
                    continue
                stalled = stalls.stalled_until(now)
                if stalled is None:
                    break
                await asyncio.sleep(stalled - now)
            self.queue.popleft()
            if self.link.blackholed:
                return
            if data is None:
                if self.writer.can_write_eof():
                    try:
                        self.writer.write_eof()
                    except OSError:
                        pass
                return
            self.buffered -= len(data)
            self.has_room.set()
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                return


class _Connection:
    def __init__(self, emulator: LinkEmulator, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.emulator = emulator
        self.client_writer = client[1]
        self.upstream_writer = upstream[1]
        self.last_activity = time.monotonic()
        self.blackholed = False
        #: black-holed in "unread" mode: neither socket is read any more
        self.unread = False
        self.parked = asyncio.Event()
        self.up = _Pipe(self, client[0], upstream[1], upward=True)
        self.down = _Pipe(self, upstream[0], client[1], upward=False)

    def check_nat(self, now: float) -> bool:
        timeout = self.emulator.profile.nat_timeout
        if not self.blackholed and timeout is not None and now - self.last_activity >= timeout:
            self.blackhole(self.emulator.profile.blackhole)
        return self.blackholed

    def blackhole(self, mode: str) -> None:
        """The mapping is gone: nothing passes from now on, and nobody is told."""
        self.blackholed = True
        self.unread = mode == "unread"
        self.emulator.stats.blackholed += 1
        for pipe in (self.up, self.down):
            pipe.has_data.set()
            pipe.has_room.set()

    def close_side(self, writer: asyncio.StreamWriter) -> None:
        writer.close()

    def abort(self) -> None:
        """Both sockets end with an RST, as a carrier reset or a rebooting relay does."""
        for writer in (self.client_writer, self.upstream_writer):
            reset_connection(writer.transport)

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(c) for c in
                 (self.up.read_loop(), self.up.write_loop(), self.down.read_loop(), self.down.write_loop())]
        faults = asyncio.ensure_future(self._random_resets())
        try:
            await asyncio.wait(tasks)
        finally:
            faults.cancel()
            for task in tasks:
                task.cancel()
            for writer in (self.client_writer, self.upstream_writer):
                writer.close()

    async def _random_resets(self) -> None:
        emulator = self.emulator
        mean = emulator.profile.reset_mean_interval
        if not mean:
            return
        await asyncio.sleep(emulator.rng.expovariate(1.0 / mean))
        if emulator.stats.resets < MAX_RESETS:
            emulator.stats.resets += 1
            self.abort()


class LinkEmulator:
    """Listens on 127.0.0.1 and forwards each connection to ``target`` through ``profile``."""

    def __init__(self, target_host: str, target_port: int, profile: LinkProfile) -> None:
        if target_host not in ("127.0.0.1", "localhost"):
            raise ValueError("the link emulator forwards to loopback only")
        self.target = (target_host, target_port)
        self.profile = profile
        self.stats = LinkStats()
        self.rng = random.Random(profile.seed)
        self.stalls = StallSchedule(profile, time.monotonic())
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> LinkEmulator:
        listener = _small_buffer_socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        self._server = await asyncio.start_server(self._accept, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        self.stalls = StallSchedule(self.profile, time.monotonic())
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.arrivals.append(time.monotonic())
        if self.stats.connections > MAX_CONNECTIONS:
            writer.close()
            return
        # SYN and SYN-ACK cross the link before the first byte may leave.
        await asyncio.sleep(2 * self.profile.one_way_delay)
        try:
            upstream = await asyncio.wait_for(self._connect_upstream(), UPSTREAM_CONNECT_TIMEOUT)
        except (TimeoutError, OSError):
            writer.close()  # the relay is down: the agent sees the connection end
            return
        link = _Connection(self, (reader, writer), upstream)
        self.connections.add(link)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run()
        finally:
            self.connections.discard(link)
            if task is not None:
                self._tasks.discard(task)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = _small_buffer_socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def blackhole_all(self, mode: str | None = None) -> int:
        """Silently drop every live mapping now (a carrier NAT restart); returns how many.

        ``mode`` is "discard" or "unread" (see LinkProfile.blackhole); None = the profile's.
        """
        mode = mode or self.profile.blackhole
        if mode not in BLACKHOLE_MODES:
            raise ValueError(f"mode must be one of {', '.join(BLACKHOLE_MODES)}, not {mode!r}")
        links = [link for link in self.connections if not link.blackholed]
        for link in links:
            link.blackhole(mode)
        return len(links)

    def released_by(self) -> dict[str, int]:
        """How many black-holed connections each end has let go of (sent FIN or RST).

        An end that detects the dead path must close its socket even though
        nothing it writes can leave; the kernel sees its FIN or RST arrive
        whether or not the emulator reads.
        """
        holes = [link for link in self.connections if link.blackholed]
        return {
            "agent": sum(1 for link in holes if peer_gone(link.client_writer)),
            "relay": sum(1 for link in holes if peer_gone(link.upstream_writer)),
        }

    def reset_all(self) -> int:
        """RST every live connection (a relay restart, seen from the path); returns how many."""
        links = list(self.connections)
        for link in links:
            link.abort()
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.connections):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> LinkEmulator:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _small_buffer_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, KERNEL_RECEIVE_BUFFER)
    return sock


def peer_gone(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer on this socket ended its connection (FIN or RST), read or not."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state != TCP_ESTABLISHED
