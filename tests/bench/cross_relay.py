"""A dial across relays (dialer on relay A, binder on relay B) next to a dial on one relay, same run.

Real processes on 127.0.0.1: one ``outpost-controller serve --role controller``
and two ``--role relay`` processes on its SQLite store; a binder agent on each
relay (the same echo and sink services behind both), one dialer agent on relay
A dialing each binder's services. The two paths take turns for ``--rounds``
rounds: ``--requests`` round trips of ``--size`` bytes (per round its p50 and
p99), then ``--megabytes`` into a sink that confirms the count (Mbit/s). Per
path: the median over rounds. Last line: JSON.

    .venv/bin/python tests/bench/cross_relay.py [--rounds 5 --requests 1000 --megabytes 64] [--box]

``--box``: relay A is the one box (``serve --role all``, controller and relay in one process) with
relay B added to it, the way a single box grows (controller/box_relay.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import (  # noqa: E402
    EchoServer,
    SinkServer,
    alternate,
    connect,
    emit,
    int_arg,
    machine,
    median,
    percentile,
    ratio,
    recv_exactly,
    send_bulk,
)
from tests.e2e.cross_relay_harness import (  # noqa: E402
    RelayProcess,
    RoleController,
    enroll_gateway,
    hosted,
    start_agent_on,
)
from tests.e2e.harness import free_port, wait_until  # noqa: E402

DEFAULT_SIZE = 64  # a Modbus/TCP request or a small RPC
DEFAULT_REQUESTS = 1000  # enough samples for a p99, about a second a path
DEFAULT_MEGABYTES = 64  # a few hundred milliseconds a path: long enough to be past the windows' ramp
DEFAULT_ROUNDS = 5
WARMUP_REQUESTS = 20  # the first dial opens the link between the relays: not measured


def round_trips(port: int, size: int, requests: int) -> list[float]:
    payload = os.urandom(size)
    samples: list[float] = []
    with connect(port) as sock:
        for index in range(WARMUP_REQUESTS + requests):
            started = time.perf_counter()
            sock.sendall(payload)
            if recv_exactly(sock, size) != payload:
                raise RuntimeError("the echo came back different")
            if index >= WARMUP_REQUESTS:
                samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    size, requests = int_arg("size", DEFAULT_SIZE), int_arg("requests", DEFAULT_REQUESTS)
    megabytes, rounds = int_arg("megabytes", DEFAULT_MEGABYTES), int_arg("rounds", DEFAULT_ROUNDS)
    echo, sink = EchoServer(), SinkServer()
    processes = []
    with tempfile.TemporaryDirectory(prefix="outpost-cross-relay-") as tmp:
        tmp_path = Path(tmp)
        box = "--box" in sys.argv
        controller = RoleController(tmp_path / "controller", "all" if box else "controller")
        processes.append(controller.process)
        try:
            if box:
                address = controller.url.removeprefix("https://")
                relay_a = SimpleNamespace(address=address, url=f"wss://{address}/v1/tunnel", name="box")
            else:
                relay_a = RelayProcess(controller, tmp_path, "ra")
                processes.append(relay_a.process)
            relay_b = RelayProcess(controller, tmp_path, "rb")
            processes.append(relay_b.process)
            for service in ("echo-near", "sink-near", "echo-far", "sink-far"):
                controller.ctl("service", "create", service)
            controller.ctl("policy", "create", "--kind", "bind", "--identities", "near,far",
                           "--services", "echo-near,sink-near,echo-far,sink-far")
            controller.ctl("policy", "create", "--kind", "dial", "--identities", "dialer",
                           "--services", "echo-near,sink-near,echo-far,sink-far")
            ports = {name: free_port() for name in ("echo-near", "sink-near", "echo-far", "sink-far")}
            for name, relay in (("near", relay_a), ("far", relay_b)):
                state = enroll_gateway(controller, tmp_path, name)
                processes.append(start_agent_on(tmp_path, name, state, relay,
                                                binds={f"echo-{name}": echo.port, f"sink-{name}": sink.port}))
            dialer = enroll_gateway(controller, tmp_path, "dialer")
            processes.append(start_agent_on(tmp_path, "dialer", dialer, relay_a, dials=ports))
            wait_until(lambda: hosted(controller, "rb", "echo-far") and hosted(controller, "rb", "sink-far"),
                       what="rb publishing its services")
            paths = {"one_relay": "near", "cross_relay": "far"}
            latency = alternate(rounds, {path: (lambda n=name: round_trips(ports[f"echo-{n}"], size, requests))
                                         for path, name in paths.items()})
            total = megabytes * 1024 * 1024
            seconds = alternate(rounds, {path: (lambda n=name: send_bulk(ports[f"sink-{n}"], total))
                                         for path, name in paths.items()})
        finally:
            for process in reversed(processes):
                process.stop()
            echo.close()
            sink.close()
    result: dict = {"benchmark": "cross_relay", "relay_a": "box (role all)" if "--box" in sys.argv else "relay",
                    "size": size, "requests": requests, "megabytes": megabytes,
                    "rounds": rounds, "path_one_relay": "dialer agent -> relay A -> binder agent",
                    "path_cross_relay": "dialer agent -> relay A -> link -> relay B -> binder agent"}
    for path in paths:
        result[f"{path}_p50_us"] = round(median([percentile(s, 0.50) for s in latency[path]]) * 1e6, 1)
        result[f"{path}_p99_us"] = round(median([percentile(s, 0.99) for s in latency[path]]) * 1e6, 1)
        result[f"{path}_mbit_s"] = round(median([megabytes * 8 * 1.048576 / s for s in seconds[path]]), 1)
    result["extra_hop_p50_us"] = round(result["cross_relay_p50_us"] - result["one_relay_p50_us"], 1)
    result["throughput_ratio"] = ratio(result["cross_relay_mbit_s"], result["one_relay_mbit_s"])
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
