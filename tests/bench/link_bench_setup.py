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

from tests.bench.bench_setup import AGENT_START_TIMEOUT, _free_port
from tests.e2e.harness import Controller, Process, read_status, run_cli, wait_until

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


class LinkTunnelPath:
    """Controller, a binder gateway behind an emulated uplink, and (optionally) a dialer next to the relay."""

    def __init__(self, workdir: Path, profile: str, link: dict[str, object], targets: dict[str, int],
                 dial: bool = True, emulator_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.profile = profile
        self.link = link
        self.targets = targets
        self.dial = dial
        self.emulator_args = emulator_args
        self.controller: Controller | None = None
        self.emulator: Emulator | None = None
        self.binder: Process | None = None
        self.dialer: Process | None = None
        self.binder_state: Path | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> "LinkTunnelPath":
        self.controller = Controller(self.workdir / "controller")
        for service in self.targets:
            self.controller.ctl("service", "create", service, "--role", "bench")
        self.controller.ctl("policy", "create", "--kind", "bind", "--identities", "link-binder",
                            "--services", "role:bench")
        self.controller.ctl("policy", "create", "--kind", "dial", "--identities", "link-dialer",
                            "--services", "role:bench")
        relay_port = int(self.controller.url.rsplit(":", 1)[1])
        self.emulator = Emulator(relay_port, self.profile, *self.emulator_args)
        self.binder_state = self._enroll("link-binder")
        identity = json.loads((self.binder_state / "identity.json").read_text())
        identity["relays"] = [f"wss://127.0.0.1:{self.emulator.port}/v1/tunnel"]
        (self.binder_state / "identity.json").write_text(json.dumps(identity))
        link = ["[link]"] + [f"{k} = {json.dumps(v)}" for k, v in self.link.items()]
        binds = [("[[bind]]", f'service = "{s}"', f'target = "127.0.0.1:{p}"') for s, p in self.targets.items()]
        self.binder = self._run("link-binder", self.binder_state, [tuple(link), *binds])
        if self.dial:
            dialer_state = self._enroll("link-dialer")
            self.ports = {service: _free_port() for service in self.targets}
            dials = [("[[dial]]", f'service = "{s}"', f'listen = "127.0.0.1:{self.ports[s]}"') for s in self.targets]
            self.dialer = self._run("link-dialer", dialer_state, dials)
        return self

    def _enroll(self, name: str) -> Path:
        assert self.controller is not None
        token = self.workdir / f"{name}.token"
        self.controller.ctl("identity", "create", name, "--token-out", str(token))
        state = self.workdir / f"{name}-state"
        result = run_cli("agent", "enroll", "--token", str(token), "--state", str(state), "--keystore", "software")
        if result.returncode != 0:
            raise RuntimeError(f"enrolling {name} failed: {result.stderr.strip()}")
        return state

    def _run(self, name: str, state: Path, sections: list[tuple[str, ...]]) -> Process:
        lines = [f'state_dir = "{state}"', 'log_level = "warning"', "", "[keystore]", 'backend = "software"', ""]
        for section in sections:
            lines += [*section, ""]
        config = self.workdir / f"{name}.toml"
        config.write_text("\n".join(lines))
        agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
        try:
            wait_until(lambda: read_status(state).get("state") == "connected", timeout=AGENT_START_TIMEOUT,
                       what=f"{name} connected")
        except AssertionError:
            agent.stop()
            raise RuntimeError(f"agent {name} did not connect within {AGENT_START_TIMEOUT} s:\n{agent.output}")
        return agent

    def binder_status(self) -> dict:
        assert self.binder_state is not None
        return read_status(self.binder_state)

    def stop(self) -> dict:
        """Stop everything; the emulator's counters."""
        for process in (self.dialer, self.binder):
            if process is not None:
                process.stop()
        counters = self.emulator.stop() if self.emulator is not None else {}
        if self.controller is not None:
            self.controller.process.stop()
        return counters
