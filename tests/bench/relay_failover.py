"""SIGKILL a relay holding gateways: how long until every one is back on the other relay.

Real processes on 127.0.0.1: one ``outpost-controller serve --role controller``
and two ``--role relay`` processes on its SQLite store. One load process (this
one) runs ``--gateways`` of the agent's own ``TunnelSupervisor`` (its
failover, backoff and protocol code), each an enrolled identity with its own
key, instead of that many agent processes. Once all are connected, the relay
holding more of them is killed with SIGKILL; reported: how many moved, when the
first and the last were back on the other relay (from the kill), and whether
any tunnel already on the survivor dropped.

    .venv/bin/python tests/bench/relay_failover.py [--gateways 100]

Prints one JSON object as its last line. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.identity.csr import build_csr  # noqa: E402
from agent.identity.ephemeral import EphemeralKeyStore  # noqa: E402
from agent.tunnel.client import TunnelCredentials, TunnelOptions  # noqa: E402
from agent.tunnel.supervisor import TunnelSupervisor  # noqa: E402
from tests.e2e.harness import admin_token_in  # noqa: E402
from tests.e2e.relay_harness import RelayProcess, RoleController  # noqa: E402

DEFAULT_GATEWAYS = 100
#: Every gateway connected within this long, or the run fails.
CONNECT_TIMEOUT = 120.0
#: Every moved gateway back within this long, or the run reports the stragglers.
FAILOVER_TIMEOUT = 60.0
#: How often the supervisors' states are sampled.
POLL = 0.02


def api(controller: RoleController, method: str, path: str, body: dict | None = None, admin: bool = True) -> dict:
    tls = ssl.create_default_context(cafile=str(controller.data / "ca" / "ca.pem"))
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {admin_token_in(controller.data)}"
    request = urllib.request.Request(controller.url + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, context=tls, timeout=30) as answer:
        return dict(json.loads(answer.read()))


def enroll(controller: RoleController, name: str) -> tuple[TunnelCredentials, list[str]]:
    created = api(controller, "POST", "/api/v1/identities", {"name": name, "roles": ["gateway"]})
    keystore = EphemeralKeyStore()
    keystore.create()
    csr = build_csr(keystore, name).public_bytes(serialization.Encoding.PEM).decode()
    issued = api(controller, "POST", "/v1/enroll", {"token": created["token"], "csr": csr}, admin=False)
    return (TunnelCredentials(uri=issued["identity"], chain_pem=[issued["certificate"]], ca_pem=issued["ca"],
                              keystore=keystore), list(issued["relays"]))


async def scenario(gateways: int, controller: RoleController, relays: list[RelayProcess]) -> dict:
    enrolled = [enroll(controller, f"gw-{n}") for n in range(gateways)]
    supervisors = [TunnelSupervisor(relay_list, credentials, TunnelOptions()) for credentials, relay_list in enrolled]
    tasks = [asyncio.ensure_future(s.run()) for s in supervisors]
    try:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not all(s.stats.state == "connected" for s in supervisors):
            if time.monotonic() > deadline:
                raise RuntimeError("not every gateway connected in time")
            await asyncio.sleep(0.1)
        by_url = {relay.url: [s for s in supervisors if s.stats.relay == relay.url] for relay in relays}
        doomed = max(relays, key=lambda relay: len(by_url[relay.url]))
        survivor = next(relay for relay in relays if relay is not doomed)
        moving, staying = by_url[doomed.url], by_url[survivor.url]
        staying_sessions = {id(s): s.session for s in staying}
        doomed.process.proc.kill()
        killed = time.monotonic()
        back: dict[int, float] = {}
        while len(back) < len(moving) and time.monotonic() - killed < FAILOVER_TIMEOUT:
            for s in moving:
                if id(s) not in back and s.stats.state == "connected" and s.stats.relay == survivor.url:
                    back[id(s)] = time.monotonic() - killed
            await asyncio.sleep(POLL)
        dropped = sum(1 for s in staying if s.session is not staying_sessions[id(s)] or s.stats.state != "connected")
        times = sorted(back.values())
        return {"gateways": gateways, "moved": len(moving), "stayed": len(staying), "back": len(back),
                "first_back_s": round(times[0], 2) if times else None,
                "median_back_s": round(times[len(times) // 2], 2) if times else None,
                "all_back_s": round(times[-1], 2) if len(times) == len(moving) else None,
                "survivors_dropped": dropped}
    finally:
        for s in supervisors:
            s.stop()
        await asyncio.wait(tasks, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=DEFAULT_GATEWAYS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="outpost-failover-") as work:
        root = Path(work)
        controller = RoleController(root / "controller", "controller")
        relays: list[RelayProcess] = []
        try:
            relays = [RelayProcess(controller, root, "r1"), RelayProcess(controller, root, "r2")]
            time.sleep(2.0)  # both heartbeats in the store, so enrollment names both
            result = asyncio.run(scenario(args.gateways, controller, relays))
        finally:
            for relay in relays:
                relay.process.stop()
            controller.process.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
