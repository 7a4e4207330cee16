"""What the link benchmarks share: a gateway whose uplink goes through the link emulator.

The path: client -> dialer agent's ``[[dial]]`` port -> dialer agent -> relay
(``outpost-controller serve``) -> link emulator (its own process) -> binder
agent (``[[bind]]``, with a ``[link]`` section) -> service. Only the binder's
uplink is emulated: it is the gateway on cellular or satellite; the dialer
sits next to the relay. The binder is pointed at the emulator by the relay
address in its enrolled state, as if the controller had named that address.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from tests.bench.bench_setup import TunnelPath
from tests.e2e.harness import Process, read_status

# The emulator process starts in well under a second.
EMULATOR_START_TIMEOUT = 20.0


class Emulator:
    """``python -m tests.linkemu`` in its own process, so its work does not share the benchmark's CPU."""

    def __init__(self, target_port: int, profile: str, *extra: str) -> None:
        self.process = Process([sys.executable, "-m", "tests.linkemu", "--target", f"127.0.0.1:{target_port}",
                                "--profile", profile, *extra])
        line = self.process.wait_for_line("listening on", EMULATOR_START_TIMEOUT)
        self.port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])

    def snapshot(self, timeout: float = 5.0) -> dict:
        """The counters now, without stopping it."""
        seen = len(self.process.lines)
        self.process.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.process.lines[seen:]:
                if line.startswith("{"):
                    return json.loads(line)
            time.sleep(0.02)
        raise RuntimeError(f"the link emulator did not report its counters:\n{self.process.output}")

    def stop(self) -> dict:
        """Stop it; the byte counters it printed last."""
        self.process.stop()
        for line in reversed(self.process.lines):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the link emulator printed no counters:\n{self.process.output}")


class LinkTunnelPath(TunnelPath):
    """Controller, a binder gateway behind an emulated uplink, and (optionally) a dialer next to the relay."""

    BINDER, DIALER = "link-binder", "link-dialer"
    LOG_LEVEL = "warning"

    def __init__(self, workdir: Path, profile: str, link: dict[str, object], targets: dict[str, int],
                 dial: bool = True, emulator_args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, targets)
        self.profile = profile
        self.link = link
        self.dial = dial
        self.emulator_args = emulator_args
        self.emulator: Emulator | None = None
        self.binder_state: Path | None = None

    def start(self) -> LinkTunnelPath:
        self._start_controller()
        assert self.controller is not None
        relay_port = int(self.controller.url.rsplit(":", 1)[1])
        self.emulator = Emulator(relay_port, self.profile, *self.emulator_args)
        self.binder_state = self._enroll(self.BINDER)
        identity = json.loads((self.binder_state / "identity.json").read_text())
        identity["relays"] = [f"wss://127.0.0.1:{self.emulator.port}/v1/tunnel"]
        (self.binder_state / "identity.json").write_text(json.dumps(identity))
        link = ["[link]"] + [f"{k} = {json.dumps(v)}" for k, v in self.link.items()]
        self.binder = self._run(self.BINDER, self.binder_state, [tuple(link), *self._binds()])
        if self.dial:
            self._start_dialer(self._enroll(self.DIALER))
        return self

    def binder_status(self) -> dict:
        assert self.binder_state is not None
        return read_status(self.binder_state)

    def stop(self) -> dict:  # type: ignore[override]
        """Stop everything; the emulator's counters."""
        self._stop_agents()
        counters = self.emulator.stop() if self.emulator is not None else {}
        if self.controller is not None:
            self.controller.process.stop()
        return counters
