"""The fleet view at scale: 10,000 identities, 5,000 online; list time and presence writes per minute.

A real controller (TLS, management API, relay, presence book) runs in this
process on 127.0.0.1 with 10,000 enrolled identities in its store. 5,000 of
them are online on this process: tunnels as the presence book knows them
(identity, remote address, keepalive, a report), since 5,000 real TLS
tunnels do not fit on the two cores this runs on; the presence code does
not see the difference (it reads a tunnel's last seen through the same
function the relay gives it). Measured:

* ``GET /api/v1/fleet`` server round trip (median of several), and the whole
  ``outpostctl identity list --json`` as an operator runs it (a new process,
  its TLS handshake and all) against that controller.
* the dashboard's fleet page (``/ui/fleet``, logged in with the admin
  credential): server round trip (median of several) of the default page and
  of one sorted by RTT, descending; each reads and sorts the whole fleet and
  renders its first page of rows.
* presence writes: a simulated ten minutes of the 5,000 tunnels sending
  keepalives (25 s: ethernet, the worst case; 540 s: metered), batch by batch
  as the relay writes them: rows and transactions per minute, and the real
  time of the largest batch written to the store.

The last line is one JSON object.

    .venv/bin/python tests/bench/fleet_view.py [--identities 10000] [--online 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.presence import PRESENCE_FLUSH_INTERVAL, PresenceBook, TunnelPresence  # noqa: E402
from tests.bench.bench_setup import machine  # noqa: E402
from tests.controller.harness import running_controller  # noqa: E402

# Fleet-view requests timed; the median is reported.
API_RUNS = 7
# Whole outpostctl runs timed (each a new process).
CLI_RUNS = 3
# Minutes of keepalives simulated for the write count.
SIMULATED_MINUTES = 10
# The goals.
LIST_GOAL_SECONDS = 1.0
DASHBOARD_GOAL_SECONDS = 0.5
REPORT = {"agent_version": "0.9.0", "os": "Debian GNU/Linux 12 (bookworm)", "arch": "aarch64",
          "link_profile": "cellular", "rtt_ms": 84.0, "clock_offset_s": 0.02, "clock_source": "ntp",
          "key_backend": "tpm", "cert_not_after": 0.0, "next_renewal": 0.0, "renewal_error": None,
          "keepalive_s": 108.0}


def fill_store(ctl, identities: int) -> None:
    now = time.time()
    with ctl.context.store.transaction() as db:
        for n in range(identities):
            tenant = f"t{n % 10}"
            db.execute("INSERT INTO identities (tenant, name, roles, status, created_at, enrolled_at, "
                       "cert_not_after, key_sha256) VALUES (?, ?, ?, 'enrolled', ?, ?, ?, ?)",
                       (tenant, f"gw-{n:05d}", '["gateway"]', now - 86400, now - 3600,
                        now + random.uniform(3600, 86400), f"{n:064x}"))


def go_online(book: PresenceBook, online: int) -> list[list[float]]:
    """``online`` tunnels in the book, each with a report; returns each one's settable last seen."""
    now = time.time()
    seen = []
    for n in range(online):
        last = [now]
        seen.append(last)
        tunnel = TunnelPresence(f"t{n % 10}", f"gw-{n:05d}", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}:443",
                                now - 600, 108.0, (lambda cell=last: cell[0]))
        book.up(tunnel)
        book.report(tunnel, dict(REPORT, cert_not_after=now + 86400, next_renewal=now + 50000))
    return seen


def simulate_writes(book: PresenceBook, seen: list[list[float]], keepalive: float, start: float) -> dict:
    """Rows and batches the book writes while every tunnel pings every ``keepalive`` seconds from ``start``.

    Each simulation starts after the previous one ended: the book remembers what it wrote.
    """
    offsets = [random.uniform(0, keepalive) for _ in seen]
    rows = batches = 0
    largest: list = []
    steps = int(SIMULATED_MINUTES * 60 / PRESENCE_FLUSH_INTERVAL)
    for step in range(1, steps + 1):
        t = start + step * PRESENCE_FLUSH_INTERVAL
        for cell, offset in zip(seen, offsets, strict=True):
            # The last keepalive exchange before t.
            cell[0] = start + offset + ((t - start - offset) // keepalive) * keepalive if t - start > offset \
                else cell[0]
        batch = book.collect()
        rows += len(batch)
        batches += 1
        if len(batch) > len(largest):
            largest = batch
    started = time.perf_counter()
    book.write(largest)
    write_seconds = time.perf_counter() - started
    return {"end": start + steps * PRESENCE_FLUSH_INTERVAL, "keepalive_s": keepalive, "rows_per_minute": round(rows / SIMULATED_MINUTES, 1),
            "transactions_per_minute": round(batches / SIMULATED_MINUTES, 1),
            "largest_batch_rows": len(largest), "largest_batch_write_s": round(write_seconds, 3)}


async def dashboard_cookie(ctl) -> str:
    """Log in to the dashboard as a browser does: the form, its CSRF token, the admin credential."""
    from controller.dashboard.sessions import COOKIE, LOGIN_COOKIE

    async with ctl.session.get(ctl.api_url + "/ui/login") as response:
        nonce = response.cookies[LOGIN_COOKIE].value
        csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert csrf is not None
    async with ctl.session.post(ctl.api_url + "/ui/login", data={"csrf": csrf.group(1), "token": ctl.admin_token},
                                headers={"Cookie": f"{LOGIN_COOKIE}={nonce}"}, allow_redirects=False) as response:
        assert response.status == 303, await response.text()
        return str(response.cookies[COOKIE].value)


async def time_dashboard(ctl, path: str, cookie: str) -> tuple[float, int]:
    """Median seconds of ``API_RUNS`` requests of a dashboard page, and its size in bytes."""
    times = []
    for _ in range(API_RUNS):
        started = time.perf_counter()
        async with ctl.session.get(ctl.api_url + path, headers={"Cookie": f"outpost_ui={cookie}"}) as response:
            body = await response.read()
        times.append(time.perf_counter() - started)
        assert response.status == 200 and b'id="fleet"' in body, response.status
    return round(statistics.median(times), 3), len(body)


async def measure(identities: int, online: int, workdir: Path) -> dict:
    result: dict = {"identities": identities, "online": online}
    async with running_controller(workdir / "ctl") as ctl:
        random.seed(12)
        fill_store(ctl, identities)
        book = ctl.server.relay.presence
        seen = go_online(book, online)
        await book.flush()
        times = []
        for _ in range(API_RUNS):
            started = time.perf_counter()
            status, body = await ctl.call("GET", "/api/v1/fleet")
            times.append(time.perf_counter() - started)
            assert status == 200 and len(body["identities"]) >= identities, status
        states = {}
        for entry in body["identities"]:
            states[entry["presence"]] = states.get(entry["presence"], 0) + 1
        result["presence_counts"] = states
        result["api_fleet_s_median"] = round(statistics.median(times), 3)
        result["api_response_bytes"] = len(json.dumps(body))
        env = dict(os.environ, OUTPOSTCTL_CONFIG=str(ctl.context.settings.outpostctl_config_path),
                   PYTHONPATH=str(ROOT))
        cli = []
        for _ in range(CLI_RUNS):
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "outpostctl", "identity", "list",
                                                        "--json", env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            cli.append(time.perf_counter() - started)
            assert proc.returncode == 0, err
        result["cli_identity_list_json_s_median"] = round(statistics.median(cli), 3)
        result["cli_output_identities"] = len(json.loads(out)["identities"])
        cookie = await dashboard_cookie(ctl)
        result["dashboard_fleet_page_s_median"], result["dashboard_fleet_page_bytes"] = await time_dashboard(
            ctl, "/ui/fleet", cookie)
        result["dashboard_fleet_by_rtt_s_median"], _ = await time_dashboard(ctl, "/ui/fleet?sort=rtt_ms&order=desc",
                                                                            cookie)
        result["presence_writes"] = []
        start = time.time()
        for keepalive in (25.0, 540.0):
            simulated = simulate_writes(book, seen, keepalive, start)
            start = simulated.pop("end")
            result["presence_writes"].append(simulated)
    result["goal_list_under_s"] = LIST_GOAL_SECONDS
    result["goal_dashboard_under_s"] = DASHBOARD_GOAL_SECONDS
    result["goal_met"] = result["cli_identity_list_json_s_median"] < LIST_GOAL_SECONDS
    result["dashboard_goal_met"] = max(result["dashboard_fleet_page_s_median"],
                                       result["dashboard_fleet_by_rtt_s_median"]) < DASHBOARD_GOAL_SECONDS
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--online", type=int, default=5_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as tmp:
        result = asyncio.run(asyncio.wait_for(measure(args.identities, args.online, Path(tmp)), 600))
    print(json.dumps({"benchmark": "fleet_view", **result, "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
