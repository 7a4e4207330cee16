"""Run the link emulator as its own process (benchmarks keep it off their CPU).

    python -m tests.linkemu --target 127.0.0.1:8443 --profile geo [--nat-timeout 600]

Prints ``listening on 127.0.0.1:PORT``; prints the byte counters as one JSON
line on SIGUSR1, and once more on SIGTERM/SIGINT before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from tests.linkemu.emulator import LinkEmulator
from tests.linkemu.profiles import PROFILES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.linkemu")
    parser.add_argument("--target", required=True, help="127.0.0.1:PORT to forward to")
    parser.add_argument("--profile", default="clean", choices=sorted(PROFILES))
    parser.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0 = any)")
    parser.add_argument("--nat-timeout", type=float, help="override the profile's NAT idle timeout (s)")
    parser.add_argument("--seed", type=int, help="override the profile's random seed")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    profile = PROFILES[args.profile]
    if args.nat_timeout is not None:
        profile = profile.but(nat_timeout=args.nat_timeout)
    if args.seed is not None:
        profile = profile.but(seed=args.seed)

    async def serve() -> None:
        emulator = await LinkEmulator(host, int(port), profile).start(args.port)
        print(f"listening on {emulator.address} profile {profile.name}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps(emulator.stats.as_json()), flush=True))
        await stop.wait()
        stats = emulator.stats.as_json()
        await emulator.close()
        print(json.dumps(stats), flush=True)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
