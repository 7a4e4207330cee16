"""Single-stream throughput over an emulated GEO satellite uplink, next to direct TCP over the same path.

The GEO profile (tests/linkemu/profiles.py): 300 ms each way (600 ms round
trip), 20 Mbit/s each way, a 512 KiB terminal queue. Measured in alternating
rounds in one run:

* tunnel, to the gateway: client -> dialer agent -> relay -> GEO -> binder
  agent (profile "satellite") -> sink. The binder's receive window governs.
* tunnel, from the gateway: source -> binder agent -> GEO -> relay -> dialer
  agent -> client. The relay's receive window governs.
* direct: client -> GEO emulator -> sink (and source -> GEO -> client), plain
  TCP through an emulator process with the same profile.

The emulator ends TCP on both sides, as the performance-enhancing proxy of a
satellite terminal does, so neither path pays TCP slow start over 600 ms;
each new connection waits one round trip before its first byte, as a TCP
handshake does, which is what the tunnel's stream open (OPEN, then ACCEPT
from the far gateway) costs too.

Each figure is bytes / seconds from the client's first send (or request) to the
last byte confirmed, the median of the rounds. The last line is one JSON object.

    .venv/bin/python tests/bench/satellite.py [--megabytes 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.bench.bench_setup import (  # noqa: E402
    COUNT,
    SinkServer,
    _ThreadedServer,
    connect,
    machine,
    recv_exactly,
    send_bulk,
)
from tests.bench.link_bench_setup import Emulator, LinkTunnelPath  # noqa: E402
from tests.linkemu.profiles import GEO  # noqa: E402

SINK = "sat-sink"
SOURCE = "sat-source"
# Sent by the source per request, at most: a bound on what a bad request makes it send.
MAX_SOURCE_BYTES = 1 << 30
SOURCE_CHUNK = 256 * 1024


class SourceServer(_ThreadedServer):
    """Reads a byte count, sends that many bytes, closes."""

    def handle(self, conn: socket.socket) -> None:
        (total,) = COUNT.unpack(recv_exactly(conn, COUNT.size))
        total = min(total, MAX_SOURCE_BYTES)
        block = memoryview(bytes(SOURCE_CHUNK))
        while total > 0:
            n = min(total, SOURCE_CHUNK)
            conn.sendall(block[:n])
            total -= n


def fetch_bulk(port: int, total: int) -> float:
    """Ask a source through ``port`` for ``total`` bytes; seconds until the last one arrived."""
    started = time.perf_counter()
    with connect(port) as sock:
        sock.sendall(COUNT.pack(total))
        received = 0
        buffer = bytearray(1 << 20)
        while True:
            n = sock.recv_into(buffer)
            if not n:
                break
            received += n
    elapsed = time.perf_counter() - started
    if received != total:
        raise RuntimeError(f"received {received} bytes of {total}")
    return elapsed


def mbit(total: int, seconds: float) -> float:
    return round(total * 8 / seconds / 1e6, 2)


def measure(total: int, rounds: int, window: int | None = None) -> dict:
    """Run the tunnel and direct paths over GEO in alternating rounds; the report (one dict)."""
    sink, source = SinkServer(), SourceServer()
    link: dict[str, object] = {"profile": "satellite"}
    if window:
        link["window"] = window
    results: dict[str, list[float]] = {"tunnel_to_gateway": [], "direct_to_gateway": [],
                                       "tunnel_from_gateway": [], "direct_from_gateway": []}
    with tempfile.TemporaryDirectory(prefix="outpost-sat-") as tmp:
        path = LinkTunnelPath(Path(tmp), "geo", link, {SINK: sink.port, SOURCE: source.port}).start()
        direct_sink = Emulator(sink.port, "geo")
        direct_source = Emulator(source.port, "geo")
        try:
            agent_profile = path.binder_status().get("link")
            for _ in range(rounds):
                results["tunnel_to_gateway"].append(mbit(total, send_bulk(path.ports[SINK], total)))
                results["direct_to_gateway"].append(mbit(total, send_bulk(direct_sink.port, total)))
                results["tunnel_from_gateway"].append(mbit(total, fetch_bulk(path.ports[SOURCE], total)))
                results["direct_from_gateway"].append(mbit(total, fetch_bulk(direct_source.port, total)))
            reconnects = path.binder_status().get("reconnects", 0)
        finally:
            direct_sink.stop()
            direct_source.stop()
            path.stop()
            sink.close()
            source.close()
    median = {key: statistics.median(values) for key, values in results.items()}
    return {
        "benchmark": "satellite",
        "profile": {"rtt_ms": GEO.one_way_delay * 2000, "rate_mbit": GEO.rate * 8 / 1e6,
                    "queue_bytes": GEO.queue_bytes},
        "bytes_per_transfer": total,
        "rounds": rounds,
        "agent_link_profile": agent_profile,
        "binder_window": window or "profile default",
        "mbit_s": median,
        "all_rounds": results,
        "tunnel_vs_direct_to_gateway": round(median["tunnel_to_gateway"] / median["direct_to_gateway"], 3),
        "tunnel_vs_direct_from_gateway": round(median["tunnel_from_gateway"] / median["direct_from_gateway"], 3),
        "goal": "tunnel_vs_direct >= 0.9 both ways",
        "reconnects_during_run": reconnects,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=20, help="bytes per transfer, in MB (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per path (default 2)")
    parser.add_argument("--window", type=int, help="the binder's [link] window in bytes (default: the profile's)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.megabytes * 1_000_000, args.rounds, args.window)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
