"""Admission's own work per tunnel, in process: a gateway new to the relay against one it has seen.

No TLS and no event loop: ``admit`` (controller/relay/admit.py) as a worker
thread runs it for a first admission (parse, our CA's signature, the store's
purpose row and identity row, the challenge signature), and ``admit_here`` as
the event loop runs it for a gateway the admission cache holds (the challenge
signature and the dates); and ``admit_here`` for a gateway's first admission
after a start, its certificate recognised by the DER digest the store recorded
and its identity row read once (``AdmissionCache.preload``). Real certificates from redeemed tokens, a real
SQLite store in a temporary directory.

    .venv/bin/python tests/bench/admission_cache.py [--gateways 500]

Prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from controller.relay.admit import admit, admit_here  # noqa: E402
from controller.relay.admit_cache import AdmissionCache  # noqa: E402
from shared.protocol import NONCE_SIZE  # noqa: E402
from shared.tunnel.auth import certificate_digest, sign_challenge  # noqa: E402
from tests.bench.fleet_scale import enroll_in  # noqa: E402

#: Enough admissions for a stable mean in a few seconds (each gateway is enrolled first: a CA signature each).
DEFAULT_GATEWAYS = 500


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", type=int, default=DEFAULT_GATEWAYS)
    args = parser.parse_args()
    from controller.bootstrap import open_data_dir
    from controller.settings import Settings

    with tempfile.TemporaryDirectory() as data:
        context = open_data_dir(Settings(data_dir=Path(data), listen_host="127.0.0.1", listen_port=1))
        try:
            der = context.server_certificate_der
            fleet = []
            for keystore, issued in enroll_in(context, args.gateways):
                nonce = secrets.token_bytes(NONCE_SIZE)
                fleet.append(([issued.certificate_pem], sign_challenge(keystore.sign, nonce, certificate_digest(der)),
                              nonce))
            cache = AdmissionCache()
            now = dt.datetime.now(dt.UTC)
            started = time.process_time()
            for chain, signature, nonce in fleet:
                admitted = admit(context, chain, signature, nonce, now, cache)
                cache.remember_identity(admitted.identity, cache.generation)
            cold = (time.process_time() - started) * 1e6 / len(fleet)
            started = time.process_time()
            for chain, signature, nonce in fleet:
                assert admit_here(context, cache, chain, signature, nonce, now) is not None
            warm = (time.process_time() - started) * 1e6 / len(fleet)
            started = time.process_time()
            for chain, signature, nonce in fleet:
                admit(context, chain, signature, nonce, now)
            uncached = (time.process_time() - started) * 1e6 / len(fleet)
            started_cache = AdmissionCache()  # as a relay process starting under this fleet
            started_cache.preload(context.registry, context.store, context.ca.certificate)
            started = time.process_time()
            for chain, signature, nonce in fleet:
                assert admit_here(context, started_cache, chain, signature, nonce, now) is not None
            recognised = (time.process_time() - started) * 1e6 / len(fleet)
        finally:
            context.close()
    print(json.dumps({
        "benchmark": "admission_cache", "python": sys.version.split()[0], "load_average": os.getloadavg(),
        "gateways": len(fleet), "first_admission_us": round(cold), "cached_admission_us": round(warm),
        "without_cache_us": round(uncached), "first_after_start_us": round(recognised),
    }))


if __name__ == "__main__":
    main()
