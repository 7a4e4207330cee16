"""Enrollment and renewal throughput of one controller process on each store, and of two on PostgreSQL.

For each store (SQLite in the data directory; PostgreSQL 15 started here as
tests/controller/postgres_harness.py starts it, on a unix socket), one real
``outpost-controller serve`` process: ``--count`` identities are created
through the management API, then enrolled over HTTPS with ``--concurrency``
requests in flight, then each renews once with its enrolled key. Keys and
CSRs are made before the clock starts. On PostgreSQL the enrollment is
measured again with two processes sharing the store and the requests split
between them: both take the store's one write lock (controller/store_postgres.py).
Last line: JSON.

    .venv/bin/python tests/bench/store_throughput.py [--count 300] [--concurrency 16]
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp  # noqa: E402

from tests.bench.bench_setup import emit, int_arg, machine  # noqa: E402
from tests.controller.harness import make_csr, make_key  # noqa: E402
from tests.controller.postgres_harness import missing_reason, postgres_server  # noqa: E402
from tests.e2e.harness import Process, admin_token_in  # noqa: E402

#: Enough enrollments that a run lasts seconds, not milliseconds, on either store.
DEFAULT_COUNT = 300
#: Requests in flight: a fleet's burst after an outage is many at once; 16 fill two API workers' queues.
DEFAULT_CONCURRENCY = 16
#: A generous bound for one burst on a loaded 2-core machine.
BURST_TIMEOUT = 300.0


class Served:
    def __init__(self, data: Path, store: str | None) -> None:
        argv = [sys.executable, "-m", "controller.cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0"]
        self.process = Process(argv + (["--store", store] if store else []))
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.token = admin_token_in(data)
        self.tls = ssl.create_default_context(cafile=str(data / "ca" / "ca.pem"))


async def burst(calls: list[tuple[Served, str, dict, bool]], concurrency: int) -> tuple[float, list[tuple[int, Any]]]:
    """(seconds, results) of every POST, at most ``concurrency`` in flight."""
    limit = asyncio.Semaphore(concurrency)

    async def post(session: aiohttp.ClientSession, served: Served, path: str, body: dict, admin: bool):
        headers = {"Authorization": f"Bearer {served.token}"} if admin else {}
        async with limit, session.post(served.url + path, json=body, headers=headers, ssl=served.tls) as response:
            return response.status, await response.json(content_type=None)

    timeout = aiohttp.ClientTimeout(total=BURST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(post(session, s, p, b, a) for s, p, b, a in calls))
        return time.perf_counter() - started, results


def measure(processes: list[Served], count: int, concurrency: int, prefix: str, renew: bool) -> dict[str, float]:
    first = processes[0]
    _, created = asyncio.run(burst([(first, "/api/v1/identities", {"name": f"{prefix}{n}", "roles": []}, True)
                                    for n in range(count)], concurrency))
    assert all(status == 201 for status, _ in created), created[:2]
    keys = [make_key() for _ in range(count)]
    enrolls = [(processes[n % len(processes)], "/v1/enroll",
                {"token": body["token"], "csr": make_csr(keys[n], f"{prefix}{n}")}, False)
               for n, (_, body) in enumerate(created)]
    seconds, results = asyncio.run(burst(enrolls, concurrency))
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:2]
    found = {"enroll_per_s": round(count / seconds, 1)}
    if renew:
        renewals = [(first, "/v1/renew", {"csr": make_csr(keys[n], f"{prefix}{n}")}, False) for n in range(count)]
        seconds, results = asyncio.run(burst(renewals, concurrency))
        assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:2]
        found["renew_per_s"] = round(count / seconds, 1)
    return found


def main() -> None:
    count = int_arg("count", DEFAULT_COUNT)
    concurrency = int_arg("concurrency", DEFAULT_CONCURRENCY)
    result: dict[str, Any] = {"benchmark": "store_throughput", "count": count, "concurrency": concurrency}
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as temp:
        served = Served(Path(temp) / "sqlite", None)
        try:
            result["sqlite"] = measure([served], count, concurrency, "s", renew=True)
        finally:
            served.process.stop()
        reason = missing_reason()
        if reason is not None:
            print(f"store_throughput: PostgreSQL is not measured: {reason}", file=sys.stderr)
            result["postgresql"] = None
            result["postgresql_skipped"] = reason
        else:
            with postgres_server() as server:
                url = server.create_database()
                data = Path(temp) / "pg"
                one = Served(data, url)
                try:
                    result["postgresql"] = measure([one], count, concurrency, "p", renew=True)
                    two = Served(data, url)
                    try:
                        result["postgresql"]["enroll_per_s_two_processes"] = measure(
                            [one, two], count, concurrency, "q", renew=False)["enroll_per_s"]
                    finally:
                        two.process.stop()
                finally:
                    one.process.stop()
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
