"""``outpost-controller serve`` as a process of its own, beside the test's controller or instead of it.

What the multi-process tests (two processes on one data directory, several on
one PostgreSQL store, a controller restored from a backup) share: the
process, its URL, an outpostctl config naming it, and its live tunnels.
"""

from __future__ import annotations

import json
import ssl
import sys
import tomllib
import urllib.request
from pathlib import Path

from controller.store import Store
from tests.e2e.harness import Process, python_env, run_cli

#: How long one read of the status API may take on a loaded machine.
STATUS_TIMEOUT = 5.0


def ctl_config_naming(data: Path, url: str, path: Path) -> Path:
    """At ``path``, the outpostctl config ``data`` holds, naming ``url``: it keeps naming that process
    after another process on the same data directory rewrote the shared one with its own URL."""
    config = (data / "outpostctl.toml").read_text()
    path.write_text("\n".join(f'url = "{url}"' if line.startswith("url = ") else line
                              for line in config.splitlines()) + "\n")
    return path


def bind_published(store_location: Path | str, service: str) -> bool:
    """True once some process published a bind of ``service`` in the store (controller/relay/directory.py):
    every process in role all is a relay of the store, and a dial at another one finds the gateway from then."""
    store = Store(store_location)
    try:
        return bool(store.query("SELECT 1 FROM relay_services WHERE service = ?", (service,)))
    finally:
        store.close()


class ServeProcess:
    """``serve`` on ``data`` (and the ``store`` URL, if given) on a loopback ``port`` (0: one the kernel picks).

    ``ctl_config`` is the operator's outpostctl config for this process: when absent it is
    written from the data directory's, naming this process's URL (each process rewrites the
    shared one with its own); when present it is kept (a backup leaves the data directory's out).
    """

    def __init__(self, data: Path, ctl_config: Path, *, port: int = 0, store: str | None = None) -> None:
        argv = [sys.executable, "-m", "controller.cli", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}"]
        self.process = Process(argv + (["--store", store] if store is not None else []))
        line = self.process.wait_for_line("ready on https://")
        self.url = line.split("ready on ", 1)[1].split()[0]
        self.data = data
        if not ctl_config.exists():
            ctl_config_naming(data, self.url, ctl_config)
        self.ctl_config = ctl_config
        self.token = tomllib.loads(ctl_config.read_text())["token"]
        self.tls = ssl.create_default_context(cafile=str(data / "ca" / "ca.pem"))

    def ctl(self, *args: str) -> None:
        env = python_env()
        env["OUTPOSTCTL_CONFIG"] = str(self.ctl_config)
        result = run_cli("outpostctl", *args, env=env)
        assert result.returncode == 0, result.stderr

    def tunnels(self) -> list[dict]:
        """This process's live tunnels, straight from its management API (no CLI start-up in the way)."""
        request = urllib.request.Request(self.url + "/api/v1/status", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, context=self.tls, timeout=STATUS_TIMEOUT) as response:
            return json.loads(response.read())["tunnels"]
