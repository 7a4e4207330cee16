"""Controller memory per idle unauthenticated connection, and a live tunnel's round trip meanwhile.

A real ``outpost-controller`` process on 127.0.0.1 (its deadlines lengthened
so that idle connections are held for the measurement, its caps raised above
the count) gets one authenticated tunnel, then ``--connections`` TLS
connections that complete their handshake and send nothing. Reported, for
each event loop the controller can run on (asyncio's own, and uvloop where
installed): the controller's resident memory per held connection, how much of
it came back once they closed, and the tunnel's PING round trip (p50/p99)
before, while the connections open, while they are held, and after.

    .venv/bin/python tests/bench/idle_connections.py [--connections 3000] [--loops asyncio,uvloop]

Prints one JSON object as its last line. Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.identity.csr import build_csr  # noqa: E402
from agent.identity.ephemeral import EphemeralKeyStore  # noqa: E402
from agent.identity.tls_trust import pinned_ssl_context  # noqa: E402
from agent.tunnel.client import TunnelCredentials, TunnelOptions, open_tunnel  # noqa: E402
from controller.admission import MEMORY_TRIM_INTERVAL  # noqa: E402

#: The issue's figure: a relay should hold this many idle anonymous peers cheaply.
DEFAULT_CONNECTIONS = 3000
#: Handshakes in parallel from this process (blocking sockets in threads: no client-side TLS buffers).
OPENERS = 16
#: The controller under test keeps idle connections this long (the real deadlines are seconds).
HELD_DEADLINE = 900.0
#: One PING every this many seconds on the live tunnel.
PING_INTERVAL = 0.02
#: A PING unanswered for this long counts as this long (and the scenario goes on).
PING_TIMEOUT = 5.0
#: Pings per quiet phase (before, held, after).
PHASE_PINGS = 150
#: Seconds for the controller's memory to settle after connections open or close.
SETTLE = 3.0
READY_TIMEOUT = 60.0
RUNNER = r"""
import dataclasses, logging, sys
sys.path.insert(0, sys.argv[1])
import shared.service_manager as service_manager
from controller import cli
from shared.event_loop import run
service_manager.configure_logging(logging.WARNING, identifier="outpost-controller")
args = cli.build_parser().parse_args(sys.argv[2:])
settings = cli.settings_from_args(args)
held = %r
limits = dataclasses.replace(settings.limits, handshake_deadline=held, head_deadline=held, body_deadline=held)
run(cli.serve(dataclasses.replace(settings, limits=limits)), args.event_loop)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Controller:
    def __init__(self, workdir: Path, loop: str, cap: int) -> None:
        data = workdir / f"controller-{loop}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", RUNNER % HELD_DEADLINE, str(ROOT), "serve", "--data", str(data),
             "--listen", "127.0.0.1:0", "--event-loop", loop, "--max-unauthenticated", str(cap),
             "--max-unauthenticated-per-address", str(cap)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        line = ""
        while time.monotonic() < deadline and not line:
            line = self.process.stdout.readline()
        match = re.match(r"outpost-controller ready on https://127\.0\.0\.1:(\d+) ", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"controller did not start: {line!r} {self.process.stderr.read()[-2000:]}")
        self.port = int(match[1])
        config = tomllib.loads((data / "outpostctl.toml").read_text())
        self.token = config["token"]
        self.ca_pem = (data / "ca" / "ca.pem").read_text()
        self.url = f"https://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, body: dict | None = None, admin: bool = True) -> dict:
        tls = ssl.create_default_context(cadata=self.ca_pem)
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, method=method, headers=headers,
                                         data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(request, context=tls, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def enroll(controller: Controller) -> TunnelCredentials:
    created = controller.api("POST", "/api/v1/identities", {"name": "pinger", "roles": ["gateway"]})
    keystore = EphemeralKeyStore()
    keystore.create()
    csr = build_csr(keystore, "pinger").public_bytes(serialization.Encoding.PEM).decode()
    issued = controller.api("POST", "/v1/enroll", {"token": created["token"], "csr": csr}, admin=False)
    return TunnelCredentials(uri=issued["identity"], chain_pem=[issued["certificate"]], ca_pem=issued["ca"],
                             keystore=keystore)


def open_idle(port: int, tls: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return tls.wrap_socket(raw, server_hostname="localhost")


async def ping_once(session) -> float:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future = loop.create_future()

    def listener(rtt: float) -> None:
        if not answered.done():
            answered.set_result(rtt)

    session.pong_listeners.append(listener)
    started = time.perf_counter()
    try:
        session.conn.ping(session.now())
        session.schedule_flush()
        await asyncio.wait_for(answered, PING_TIMEOUT)
        return (time.perf_counter() - started) * 1000
    except TimeoutError:
        return PING_TIMEOUT * 1000
    finally:
        session.pong_listeners.remove(listener)


async def ping_phase(session, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        samples.append(await ping_once(session))
        await asyncio.sleep(PING_INTERVAL)
    return samples


async def ping_until(session, done: asyncio.Future) -> list[float]:
    samples = []
    while not done.done():
        samples.append(await ping_once(session))
        await asyncio.sleep(PING_INTERVAL)
    return samples


def summary(samples: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(percentile(samples, 0.99), 3),
            "samples": len(samples)}


async def measure(controller: Controller, count: int, after_close_wait: float) -> dict:
    pid = controller.process.pid
    credentials = enroll(controller)
    client_tls = ssl.create_default_context(cadata=controller.ca_pem)
    async with aiohttp.ClientSession() as http:
        session, task = await open_tunnel(http, controller.url.replace("https://", "wss://") + "/v1/tunnel",
                                          credentials, pinned_ssl_context(credentials.ca_pem), TunnelOptions())
        try:
            before = summary(await ping_phase(session, PHASE_PINGS))
            await asyncio.sleep(SETTLE)
            baseline = rss_kib(pid)
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(OPENERS) as pool:
                opening = asyncio.gather(*(loop.run_in_executor(pool, open_idle, controller.port, client_tls)
                                           for _ in range(count)))
                during_open = await ping_until(session, opening)
                held = await opening
            open_seconds = time.monotonic() - started
            await asyncio.sleep(SETTLE)
            holding_rss = rss_kib(pid)
            holding = summary(await ping_phase(session, PHASE_PINGS))
            for sock in held:
                sock.close()
            # The controller hands freed memory back on its next look (controller/listener.py).
            await asyncio.sleep(after_close_wait)
            after_rss = rss_kib(pid)
            after = summary(await ping_phase(session, PHASE_PINGS))
        finally:
            await session.close()
            await task
    grown = holding_rss - baseline
    return {
        "connections": count,
        "open_seconds": round(open_seconds, 2),
        "controller_rss_kib": {"baseline": baseline, "holding": holding_rss, "after_close": after_rss},
        "kib_per_connection": round(grown / count, 1),
        "returned_after_close_fraction": round((holding_rss - after_rss) / grown, 3) if grown > 0 else 1.0,
        "tunnel_round_trip": {"before": before, "while_opening": summary(during_open), "holding": holding,
                              "after_close": after},
    }


def loops_available(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    from shared.event_loop import uvloop_module

    run, skipped = [], {}
    for name in requested:
        if name == "uvloop" and uvloop_module() is None:
            skipped[name] = "uvloop is not installed (python3-uvloop, or the uvloop extra)"
        else:
            run.append(name)
    return run, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--after-close-wait", type=float, default=MEMORY_TRIM_INTERVAL + SETTLE,
                        help="seconds between closing the connections and measuring memory")
    args = parser.parse_args()
    loops, skipped = loops_available([name for name in args.loops.split(",") if name])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="outpost-idle-") as workdir:
        for name in loops:
            controller = Controller(Path(workdir), name, args.connections + 100)
            try:
                results[name] = asyncio.run(measure(controller, args.connections, args.after_close_wait))
            finally:
                controller.stop()
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    from shared.event_loop import uvloop_module

    print(json.dumps({
        "benchmark": "idle_connections",
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__},
        "goal_kib_per_connection": 64,
        "default_loop": "uvloop" if uvloop_module() is not None else "asyncio",
        "loops": results,
        "skipped": skipped,
    }))


if __name__ == "__main__":
    main()
