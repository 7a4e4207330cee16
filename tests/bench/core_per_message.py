"""CPU time of the sans-IO protocol core per 64-byte round trip, both ends, with no I/O at all.

An agent and a relay ``Connection`` exchange one DATA frame each way per
round trip, each acknowledging what it received and asking ``get_timer``
after every step, as the tunnel does after every message. In one process and
without sockets, TLS or an event loop, a change to the core shows here to a
few percent where the path benchmarks (``syscalls.py``, ``latency.py``) are
lost in the noise of three processes on a shared machine. Rounds alternate
with nothing else; the median and the best are reported. Last line: JSON.

    .venv/bin/python tests/bench/core_per_message.py [--requests 20000] [--rounds 15]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shared.protocol import Connection, DataReceived, Liveness, Role  # noqa: E402
from tests.bench.bench_setup import emit, int_arg, machine  # noqa: E402

SIZE = 64
# 20,000 round trips: about 0.2 s a round, long against the clock's resolution, short against drift.
DEFAULT_REQUESTS = 20000
# 15 rounds: a median that one descheduled round does not move.
DEFAULT_ROUNDS = 15
NONCE = b"n" * 32
CHAIN = ["-----BEGIN CERTIFICATE-----\nbench\n-----END CERTIFICATE-----\n"]
SIGNATURE = b"signature"


def deliver(sender: Connection, receiver: Connection, now: float) -> None:
    """What ``sender`` queued, into ``receiver``; its data acknowledged as a reader would."""
    for event in receiver.receive_data(sender.data_to_send(), now):
        if type(event) is DataReceived:
            receiver.acknowledge_received(event.stream_id, len(event.data))
    receiver.get_timer()


def connected() -> tuple[Connection, Connection, int]:
    """An authenticated agent and relay with one open, accepted stream."""
    relay = Connection(Role.RELAY, 0.0, liveness=Liveness(None, idle_timeout=600.0))
    agent = Connection(Role.AGENT, 0.0, liveness=Liveness())
    relay.send_challenge(NONCE)
    deliver(relay, agent, 0.0)
    agent.send_auth(CHAIN, SIGNATURE)
    deliver(agent, relay, 0.0)
    relay.accept_auth({"identity": "spiffe://example.org/bench/gw", "name": "gw", "time": 1700000000})
    deliver(relay, agent, 0.0)
    if not (relay.authenticated and agent.authenticated):
        raise SystemExit("the two ends did not authenticate")
    stream_id = agent.open_stream("bench")
    deliver(agent, relay, 0.0)
    relay.accept_stream(stream_id)
    deliver(relay, agent, 0.0)
    return agent, relay, stream_id


def round_trips(agent: Connection, relay: Connection, stream_id: int, count: int, now: float) -> float:
    payload = os.urandom(SIZE)
    started = time.process_time()
    for _ in range(count):
        now += 1e-4
        agent.send_data(stream_id, payload)
        agent.get_timer()
        deliver(agent, relay, now)
        relay.send_data(stream_id, payload)
        relay.get_timer()
        deliver(relay, agent, now)
    return time.process_time() - started


def main() -> None:
    requests = int_arg("requests", DEFAULT_REQUESTS)
    rounds = int_arg("rounds", DEFAULT_ROUNDS)
    agent, relay, stream_id = connected()
    round_trips(agent, relay, stream_id, min(requests, 1000), 1.0)  # warm-up
    per_round_trip = []
    for number in range(rounds):
        seconds = round_trips(agent, relay, stream_id, requests, 10.0 + number * requests)
        per_round_trip.append(seconds * 1e6 / requests)
    emit({
        "benchmark": "core_per_message",
        "request_bytes": SIZE,
        "requests": requests,
        "rounds": rounds,
        "core_us_per_round_trip": round(statistics.median(per_round_trip), 3),
        "core_us_per_round_trip_best": round(min(per_round_trip), 3),
        "counted": "process CPU time of both Connection objects per round trip: one DATA each way, "
                   "acknowledged, get_timer after each step",
        "load_average": os.getloadavg(),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
