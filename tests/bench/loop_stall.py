"""A live stream's round trips through the relay while other peers load the controller, next to a quiet one.

The tunnel path of the other benchmarks (controller + relay process, binder
and dialer agents, an echo service) carries the live stream: a client sends
``--size`` bytes through the dialer's port and waits for the echo, over and
over, from a process of its own (so the load generator's own work never
lands in its timings). The phases, one after the other on one controller:

* quiet: nothing else happens;
* renewals_and_binds: ``--renewals`` renewals (``POST /v1/renew``: CA
  signature and an fsynced commit each, ``--concurrency`` at a time) while an
  enrolled peer sends ``--binds`` BIND frames of the most names a BIND may
  carry, all denied;
* open_flood: an enrolled peer opens ``--opens`` streams to a service it may
  not dial, ``OPEN_BATCH`` at a time;
* tiny_frames: an enrolled peer sends ``--tiny-messages`` WebSocket messages,
  each as full of PING frames (18 bytes) as a message may be, about 29,000
  frames a message, each of which the relay must parse and answer.

Per phase: p50, p99 and max of the live stream's round trip in microseconds,
and the ratios to the quiet phase. Last line: JSON.

    .venv/bin/python tests/bench/loop_stall.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.identity.csr import build_csr  # noqa: E402
from agent.identity.ephemeral import EphemeralKeyStore  # noqa: E402
from agent.identity.tls_trust import pinned_ssl_context  # noqa: E402
from agent.tunnel.client import AgentSession, TunnelCredentials, TunnelOptions, open_tunnel  # noqa: E402
from shared.protocol import MAX_BIND_SERVICES  # noqa: E402
from shared.protocol.frames import FrameType, encode_frame  # noqa: E402
from shared.protocol.limits import PING_PAYLOAD_SIZE  # noqa: E402
from shared.tunnel.session import WS_MESSAGE_MAX, ChannelReset  # noqa: E402
from tests.bench.bench_setup import (  # noqa: E402
    BENCH_ECHO,
    TUNNEL_PATH,
    EchoServer,
    connect,
    emit,
    int_arg,
    machine,
    paths,
    percentile,
    ratio,
    recv_exactly,
    wait_for_path,
)

DEFAULT_SIZE = 64
# Round trips of the quiet phase: enough samples for a p99.
DEFAULT_REQUESTS = 1000
# The load: 500 renewals at once-ish, and a BIND flood beside them.
DEFAULT_RENEWALS = 500
# Renewal requests in flight at once: a fleet's renewals after an outage arrive in a burst.
DEFAULT_CONCURRENCY = 25
# Gateways whose keys the renewals prove (each renews DEFAULT_RENEWALS / this many times).
DEFAULT_IDENTITIES = 25
DEFAULT_BINDS = 200
DEFAULT_OPENS = 3000
# Messages of the tiny-frame flood: about 29,000 PINGs each, a million frames in all.
DEFAULT_TINY_MESSAGES = 40
# Streams the flooding peer opens before waiting for their refusals: under the 256 a tunnel may hold.
OPEN_BATCH = 200
# BIND frames the flooder keeps unanswered at once.
BIND_WINDOW = 20
# No phase may run longer than this; a stuck controller fails the run instead of hanging it.
PHASE_TIMEOUT = 300.0
# The live stream's client keeps going this long at most when nobody stops it.
CANARY_MAX_SECONDS = PHASE_TIMEOUT + 30.0
# A single request to the controller.
REQUEST_TIMEOUT = 60.0


# -- the live stream, in a process of its own -------------------------------------------
def canary(port: int, size: int, requests: int) -> None:
    """Round trips through ``port`` until ``requests`` are done (0: until stdin closes); prints µs samples."""
    import select

    payload = os.urandom(size)
    samples: list[float] = []
    deadline = time.monotonic() + CANARY_MAX_SECONDS
    with connect(port) as sock:
        for _ in range(20):  # warm-up
            sock.sendall(payload)
            recv_exactly(sock, size)
        print("ready", flush=True)
        while time.monotonic() < deadline:
            if requests and len(samples) >= requests:
                break
            if not requests and select.select([sys.stdin], [], [], 0)[0]:
                break
            started = time.perf_counter()
            sock.sendall(payload)
            if recv_exactly(sock, size) != payload:
                raise RuntimeError("the echo came back different")
            samples.append((time.perf_counter() - started) * 1e6)
    print(json.dumps(samples), flush=True)


class Canary:
    """The live stream's client process for one phase."""

    def __init__(self, port: int, size: int, requests: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--canary", str(port), "--size", str(size), "--requests", str(requests)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the live stream's client did not start")

    def finish(self) -> list[float]:
        """Stop it (when it runs until told) and return its samples."""
        out, _ = self.proc.communicate("stop\n", timeout=CANARY_MAX_SECONDS)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the live stream's client failed ({self.proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "round_trips": len(samples),
        "p50_us": round(percentile(samples, 0.50), 1),
        "p99_us": round(percentile(samples, 0.99), 1),
        "max_us": round(max(samples), 1),
    }


# -- the load -------------------------------------------------------------------------
class ControllerClient:
    """HTTPS to the controller with what ``outpostctl.toml`` holds (URL, CA, admin token)."""

    def __init__(self, config_path: Path) -> None:
        config = tomllib.loads(config_path.read_text())
        self.url: str = config["url"].rstrip("/")
        self.ca_pem = Path(config["ca"]).read_text()
        self.tls = ssl.create_default_context(cadata=self.ca_pem)
        self.headers = {"Authorization": f"Bearer {config['token']}"}
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControllerClient:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls, limit=100),
                                          timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.close()

    async def post(self, path: str, body: dict, admin: bool = True) -> dict:
        assert self.http is not None
        async with self.http.post(self.url + path, json=body, headers=self.headers if admin else {}) as response:
            answer = await response.json(content_type=None)
            if response.status not in (200, 201):
                raise RuntimeError(f"POST {path}: {response.status} {answer}")
            return answer

    async def enrolled(self, name: str) -> TunnelCredentials:
        """A new identity enrolled with an in-memory key."""
        created = await self.post("/api/v1/identities", {"name": name, "roles": []})
        keystore = EphemeralKeyStore()
        keystore.create()
        issued = await self.post("/v1/enroll", {"token": created["token"], "csr": csr_pem(keystore, name)}, admin=False)
        return TunnelCredentials(uri=issued["identity"], chain_pem=[issued["certificate"]], ca_pem=issued["ca"],
                                 keystore=keystore)


def csr_pem(keystore: EphemeralKeyStore, name: str) -> str:
    return build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()


async def renewals(client: ControllerClient, gateways: list[TunnelCredentials], count: int, concurrency: int) -> float:
    """``count`` renewals, ``concurrency`` in flight; seconds they took."""
    csrs = [csr_pem(g.keystore, g.uri.rsplit("/", 1)[1]) for g in gateways]  # type: ignore[arg-type]
    queue = list(range(count))
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            i = queue.pop()
            await client.post("/v1/renew", {"csr": csrs[i % len(csrs)]}, admin=False)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def flooding_tunnel(client: ControllerClient, credentials: TunnelCredentials, http: aiohttp.ClientSession
                          ) -> tuple[AgentSession, asyncio.Task]:
    relay_url = client.url.replace("https://", "wss://") + "/v1/tunnel"
    return await open_tunnel(http, relay_url, credentials, pinned_ssl_context(credentials.ca_pem), TunnelOptions())


async def bind_flood(session: AgentSession, frames: int) -> float:
    """``frames`` BINDs of MAX_BIND_SERVICES denied names, BIND_WINDOW unanswered at most; seconds taken."""
    names = [f"flood-{i}" for i in range(MAX_BIND_SERVICES)]
    started = time.perf_counter()
    sent = 0
    deadline = time.monotonic() + PHASE_TIMEOUT
    while sent < frames or session.conn.snapshot().binds_pending:
        if time.monotonic() > deadline or session.conn.closed:
            raise RuntimeError(f"the BIND flood stalled after {sent} frames (closed: {session.conn.closed})")
        while sent < frames and session.conn.snapshot().binds_pending < BIND_WINDOW:
            session.conn.send_bind(names)
            sent += 1
        await session.flush()
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def open_flood(session: AgentSession, opens: int) -> tuple[float, int]:
    """``opens`` streams to a service the peer may not dial; (seconds, refusals)."""
    started = time.perf_counter()
    refused = 0
    for first in range(0, opens, OPEN_BATCH):
        channels = [session.open_stream("not-allowed") for _ in range(min(OPEN_BATCH, opens - first))]
        for channel in channels:
            try:
                await asyncio.wait_for(channel.wait_accepted(), PHASE_TIMEOUT)
            except ChannelReset:
                refused += 1
    return time.perf_counter() - started, refused


async def tiny_frame_flood(session: AgentSession, messages: int) -> tuple[float, int]:
    """``messages`` WebSocket messages packed with PING frames, straight onto the wire; (seconds, frames)."""
    frame = encode_frame(FrameType.PING, 0, 0, bytes(PING_PAYLOAD_SIZE))
    payload = frame * (WS_MESSAGE_MAX // len(frame))
    started = time.perf_counter()
    for _ in range(messages):
        if session.conn.closed:
            raise RuntimeError("the relay closed the flooding tunnel")
        await session.transport.send(payload)
    # A PING of the core's own: its PONG comes after every PONG the flood asked for.
    answered: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    session.pong_listeners.append(lambda rtt: None if answered.done() else answered.set_result(rtt))
    session.conn.ping(session.now())
    await session.flush()
    await asyncio.wait_for(answered, PHASE_TIMEOUT)
    return time.perf_counter() - started, messages * (len(payload) // len(frame))


async def run_phases(tunnel: Any, port: int, size: int, requests: int, renewal_count: int, concurrency: int,
                     identities: int, binds: int, opens: int, tiny_messages: int) -> dict[str, Any]:
    assert tunnel.controller is not None
    phases: dict[str, Any] = {}
    async with ControllerClient(tunnel.controller.ctl_config) as client, aiohttp.ClientSession() as http:
        gateways = [await client.enrolled(f"renewer-{i}") for i in range(identities)]
        flooder = await client.enrolled("flooder")
        session, task = await flooding_tunnel(client, flooder, http)
        try:
            quiet = Canary(port, size, requests)
            phases["quiet"] = summary(await asyncio.to_thread(quiet.finish))

            live = Canary(port, size)
            renew_seconds, bind_seconds = await asyncio.wait_for(
                asyncio.gather(renewals(client, gateways, renewal_count, concurrency), bind_flood(session, binds)),
                PHASE_TIMEOUT,
            )
            phases["renewals_and_binds"] = {
                **summary(await asyncio.to_thread(live.finish)),
                "renewals": renewal_count,
                "renewals_seconds": round(renew_seconds, 2),
                "renewals_per_second": round(renewal_count / renew_seconds, 1),
                "bind_frames": binds,
                "names_per_bind": MAX_BIND_SERVICES,
                "bind_frames_seconds": round(bind_seconds, 2),
            }

            live = Canary(port, size)
            open_seconds, refused = await asyncio.wait_for(open_flood(session, opens), PHASE_TIMEOUT)
            phases["open_flood"] = {
                **summary(await asyncio.to_thread(live.finish)),
                "opens": opens,
                "refused": refused,
                "opens_seconds": round(open_seconds, 2),
                "opens_per_second": round(opens / open_seconds, 1),
            }

            live = Canary(port, size)
            tiny_seconds, frames = await asyncio.wait_for(tiny_frame_flood(session, tiny_messages), PHASE_TIMEOUT)
            phases["tiny_frames"] = {
                **summary(await asyncio.to_thread(live.finish)),
                "messages": tiny_messages,
                "frames": frames,
                "frames_seconds": round(tiny_seconds, 2),
                "frames_per_second": round(frames / tiny_seconds, 1),
            }
        finally:
            await session.close()
            await task
    return phases


def main() -> None:
    size = int_arg("size", DEFAULT_SIZE)
    if "--canary" in sys.argv:
        canary(int_arg("canary", 0), size, int_arg("requests", 0))
        return
    # The flooding peer's refusals are the point, not news: one warning per refused name would drown the output.
    logging.getLogger("agent.tunnel").setLevel(logging.ERROR)
    requests = int_arg("requests", DEFAULT_REQUESTS)
    renewal_count = int_arg("renewals", DEFAULT_RENEWALS)
    concurrency = int_arg("concurrency", DEFAULT_CONCURRENCY)
    identities = int_arg("identities", DEFAULT_IDENTITIES)
    binds = int_arg("binds", DEFAULT_BINDS)
    opens = int_arg("opens", DEFAULT_OPENS)
    tiny_messages = int_arg("tiny-messages", DEFAULT_TINY_MESSAGES)
    echo = EchoServer()
    try:
        with paths({BENCH_ECHO: echo.port}, with_ssh=False) as (tunnel, _):
            port = tunnel.ports[BENCH_ECHO]
            wait_for_path(port)
            phases = asyncio.run(run_phases(tunnel, port, size, requests, renewal_count, concurrency, identities,
                                            binds, opens, tiny_messages))
    finally:
        echo.close()
    quiet = phases["quiet"]
    loaded = phases["renewals_and_binds"]
    flood = phases["open_flood"]
    tiny = phases["tiny_frames"]
    emit({
        "benchmark": "loop_stall",
        "request_bytes": size,
        "quiet_p50_us": quiet["p50_us"],
        "quiet_p99_us": quiet["p99_us"],
        "loaded_p50_us": loaded["p50_us"],
        "loaded_p99_us": loaded["p99_us"],
        "loaded_max_us": loaded["max_us"],
        "p50_ratio_loaded_vs_quiet": ratio(loaded["p50_us"], quiet["p50_us"]),
        "p99_ratio_loaded_vs_quiet": ratio(loaded["p99_us"], quiet["p99_us"]),
        "open_flood_p50_us": flood["p50_us"],
        "open_flood_p99_us": flood["p99_us"],
        "p99_ratio_open_flood_vs_quiet": ratio(flood["p99_us"], quiet["p99_us"]),
        "tiny_frames_p50_us": tiny["p50_us"],
        "tiny_frames_p99_us": tiny["p99_us"],
        "tiny_frames_max_us": tiny["max_us"],
        "p99_ratio_tiny_frames_vs_quiet": ratio(tiny["p99_us"], quiet["p99_us"]),
        "phases": phases,
        "path": "dialer agent -> relay -> binder agent",
        "paths": {"tunnel": TUNNEL_PATH},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
