"""``outpostctl quickstart``: the whole product on loopback, in one command.

A controller, a demo service, an identity with its token file, an enrolled
agent that binds the service, and a dial that round-trips real bytes. Every
part is the real program in its own process, as in production; only the demo
service lives inside this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.errors import OutpostError
from outpostctl.client import ManagementClient
from outpostctl.config import load_config

T = TypeVar("T")

# A fresh controller creates its CA and store; a slow SD card may need seconds.
STEP_TIMEOUT = 30.0
GATEWAY = "demo-gateway"
SERVICE = "demo-echo"
LISTENING_LINE = re.compile(r"listening on \S+:(\d+) for ")


class QuickstartFailed(OutpostError):
    """A quickstart step did not complete."""


class EchoService:
    """The demo service: echoes whatever it receives, on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


class Child:
    """A background process of the quickstart, its output kept for errors."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[], T], what: str, timeout: float = STEP_TIMEOUT) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = "\n".join(self.output().splitlines()[-5:])
        raise QuickstartFailed(f"{self.name} did not {what} (log {self.log}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._file.close()


def listening_port(output: str) -> int | None:
    """The port from connect's "listening on HOST:PORT for ..." line, once it printed one."""
    match = LISTENING_LINE.search(output)
    return int(match.group(1)) if match else None


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


class Steps:
    """Prints each step with how long it took."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last = self.start

    def done(self, text: str) -> None:
        now = time.monotonic()
        print(f"  [{now - self.last:5.2f} s] {text}", flush=True)
        self.last = now

    @property
    def total(self) -> float:
        return time.monotonic() - self.start


def run(args: argparse.Namespace) -> int:
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="outpost-quickstart-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"outpost quickstart in {workdir}", flush=True)
    steps = Steps()
    children: list[Child] = []
    echo = EchoService()
    try:
        steps.done(f"demo service '{SERVICE}' echoing on 127.0.0.1:{echo.port}")
        controller = Child("the controller", python("controller.cli", "serve", "--data", str(workdir / "controller"),
                                                    "--listen", "127.0.0.1:0"), workdir / "controller.log")
        children.append(controller)
        ready = controller.wait_for(lambda: [line for line in controller.output().splitlines() if "ready on" in line], "start")
        url = ready[0].split("ready on ", 1)[1].split()[0]
        ctl_config = workdir / "controller" / "outpostctl.toml"
        steps.done(f"controller and relay on {url} (data in {workdir / 'controller'})")

        client = ManagementClient(load_config(ctl_config))
        client.create_service(SERVICE, ["demo"], "default")
        client.create_policy("bind", ["role:gateway"], [SERVICE], "default")
        client.create_policy("dial", ["role:operator"], [SERVICE], "default")
        created = client.create_identity(GATEWAY, ["gateway"], "default")
        token = workdir / f"{GATEWAY}.token"
        token.write_text(created["token"] + "\n")
        token.chmod(0o600)
        steps.done(f"service, bind and dial policies, identity '{GATEWAY}' and its token file {token.name}")

        state = workdir / "agent"
        config = workdir / "agent.toml"
        config.write_text(f'state_dir = "{state}"\n\n[keystore]\nbackend = "software"\n\n'
                          f'[enrollment]\ntoken_paths = ["{token}"]\n\n'
                          f'[[bind]]\nservice = "{SERVICE}"\ntarget = "127.0.0.1:{echo.port}"\n')
        # The agent enrolls from the token file it finds, as on a gateway in the
        # field; the operator's dial starts at the same time.
        agent = Child("the agent", python("agent", "run", "--config", str(config)), workdir / "agent.log")
        children.append(agent)
        # Port 0: the kernel picks a free port and connect prints it, so no other process can take it between.
        connect = Child("outpostctl connect", python("outpostctl", "connect", SERVICE, "--listen", "127.0.0.1:0"),
                        workdir / "connect.log", env={"OUTPOSTCTL_CONFIG": str(ctl_config)})
        children.append(connect)
        identity = state / "identity.json"
        # The agent retires the token just after it stores its identity: wait for both.
        agent.wait_for(lambda: identity.exists() and not token.exists(), "enroll from the token file and retire it")
        uri = json.loads(identity.read_text())["uri"]
        steps.done(f"agent enrolled from {token.name} as {uri} (token retired)")
        status = state / "status.json"
        agent.wait_for(lambda: status.exists() and '"connected"' in status.read_text(), "connect its tunnel")
        steps.done("agent tunnel up, service bound at the relay")
        port = connect.wait_for(lambda: listening_port(connect.output()), "start listening")
        payload = os.urandom(64 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := s.recv(65536):
                received += chunk
        if received != payload:
            raise QuickstartFailed(f"the round trip returned {len(received)} of {len(payload)} bytes")
        steps.done(f"dial as operator: 127.0.0.1:{port} -> relay -> {GATEWAY} -> {SERVICE}: "
                   f"{len(payload)} bytes there and back")
        print(f"quickstart ok in {steps.total:.2f} s", flush=True)
        if args.once:
            return 0
        print(f"\nTry it:  nc 127.0.0.1 {port}    (type a line; the gateway's echo service answers)")
        print(f"         OUTPOSTCTL_CONFIG={ctl_config} outpostctl status")
        print("Ctrl-C stops everything.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print()
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        echo.close()
        if args.dir is None and args.once:
            shutil.rmtree(workdir, ignore_errors=True)
