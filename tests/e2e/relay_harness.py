"""Controllers and relays as separate processes on loopback, on one shared SQLite store.

Every process is stopped at the end of its test; every wait is bounded.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from tests.e2e.harness import Controller, Process, free_port, python_env, run_cli


class RoleController(Controller):
    """``outpost-controller serve --role ROLE`` on a free loopback port (or ``port``)."""

    def __init__(self, data: Path, role: str = "controller", port: int = 0, *extra: str) -> None:
        self.data = data
        self.process = Process([sys.executable, "-m", "controller.cli", "serve", "--data", str(data),
                                "--listen", f"127.0.0.1:{port}", "--role", role, *extra])
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.ctl_config = data / "outpostctl.toml"


class RelayProcess:
    """``outpost-controller serve --role relay``: enrolled with a token from ``controller`` at its first start."""

    def __init__(self, controller: Controller, tmp_path: Path, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"wss://{self.address}/v1/tunnel"
        self.data = tmp_path / f"relay-{name}"
        self.store = controller.data / "store.sqlite3"
        token = tmp_path / f"relay-{name}.token"
        controller.ctl("relay", "add", name, "--address", self.address, "--token-out", str(token))
        self.process = self.start("--enroll-token", str(token))

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "controller.cli", "serve", "--role", "relay", "--data", str(self.data),
                "--listen", self.address, "--store", str(self.store), *extra]

    def start(self, *extra: str) -> Process:
        process = Process(self.argv(*extra))
        process.wait_for_line("ready on https://")
        return process

    def restart(self) -> None:
        self.process = self.start()

    def try_start(self) -> tuple[int, str]:
        """Start it and wait for its exit (for a start that must be refused)."""
        result = run_cli("controller.cli", *self.argv()[3:], env=python_env(), timeout=60)
        return result.returncode, result.stdout + result.stderr


class TcpFront:
    """A TCP front for a controller pair: each connection goes to the first backend that accepts.

    What a load balancer with connect checks (haproxy ``balance first``) or a
    DNS name with both addresses does in production; none is installed here,
    so this stands in for it. Bounded: each connection is two threads that end
    with either side.
    """

    #: A backend that does not accept within this long is down.
    CONNECT_TIMEOUT = 1.0

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.backends: list[int] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for port in list(self.backends):
            try:
                backend = socket.create_connection(("127.0.0.1", port), timeout=self.CONNECT_TIMEOUT)
            except OSError:
                continue
            backend.settimeout(None)
            threading.Thread(target=self._pipe, args=(backend, client), daemon=True).start()
            self._pipe(client, backend)
            return
        client.close()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
