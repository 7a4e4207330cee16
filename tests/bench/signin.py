"""What people's sign-in costs: a sign-in, and the session check every management request pays.

A controller in this process trusts the test identity provider (npm
oidc-provider on 127.0.0.1 over TLS, tests/oidc). Measured:

* device_signin_ms: ``POST /api/v1/signin/device/poll`` once the person
  approved: the controller redeems the device code at the provider, fetches
  nothing else (discovery and JWKS are cached after the first), verifies
  the ID token, creates or updates the person and the session (one fsynced
  commit);
* id_token_signin_ms: ``POST /api/v1/signin/id-token`` with a nonce, the same
  without the provider round trip;
* request_ms: sequential management reads, ``GET /api/v1/identities`` with a
  person's session (hash, one indexed SELECT joined to the identity, the
  role table) and with the admin token (a salted hash compared).

p50 and p99 in milliseconds. Last line: JSON.

    .venv/bin/python tests/bench/signin.py [--signins N] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.bench_setup import machine  # noqa: E402
from tests.controller.harness import running_controller  # noqa: E402
from tests.oidc.harness import complete_device_login, node_missing, start_provider  # noqa: E402
from tests.oidc.signin_harness import PROVIDER_NAME, call, signin_settings  # noqa: E402


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": round(statistics.median(ordered), 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3), "n": len(ordered)}


async def measure(directory: Path, signins: int, requests: int) -> dict[str, Any]:
    idp = start_provider(directory)
    try:
        async with running_controller(directory / "ctl", signin=signin_settings(idp)) as running:
            device: list[float] = []
            session = ""
            for _ in range(signins):
                status, start = await call(running, "POST", "/api/v1/signin/device", {"provider": PROVIDER_NAME})
                assert status == 200, start
                await asyncio.to_thread(complete_device_login, idp, start["verification_uri_complete"], "oscar")
                began = time.perf_counter()
                status, answer = await call(running, "POST", "/api/v1/signin/device/poll",
                                            {"provider": PROVIDER_NAME, "device_code": start["device_code"]})
                device.append((time.perf_counter() - began) * 1000)
                assert status == 201, answer
                session = answer["session"]
            by_token: list[float] = []
            for _ in range(signins):
                _, nonce = await call(running, "POST", "/api/v1/signin/nonce")
                token = idp.sign({"nonce": nonce["nonce"], "preferred_username": "alice"})
                began = time.perf_counter()
                status, answer = await call(running, "POST", "/api/v1/signin/id-token",
                                            {"provider": PROVIDER_NAME, "id_token": token, "nonce": nonce["nonce"]})
                by_token.append((time.perf_counter() - began) * 1000)
                assert status == 201, answer
            timings: dict[str, list[float]] = {"person_session": [], "admin_token": []}
            for _ in range(requests):
                for kind, bearer in (("person_session", session), ("admin_token", running.admin_token)):
                    began = time.perf_counter()
                    status, _ = await call(running, "GET", "/api/v1/identities", bearer=bearer)
                    timings[kind].append((time.perf_counter() - began) * 1000)
                    assert status == 200
    finally:
        idp.stop()
    return {"device_signin_ms": summary(device), "id_token_signin_ms": summary(by_token),
            "request_ms": {kind: summary(samples) for kind, samples in timings.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signins", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    reason = node_missing()
    report: dict[str, Any] = {"benchmark": "signin", "machine": machine()}
    if reason is not None:
        print(f"signin: not measured: {reason}", file=sys.stderr)
        report["skipped"] = reason
    else:
        with tempfile.TemporaryDirectory() as directory:
            report.update(asyncio.run(measure(Path(directory), args.signins, args.requests)))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
