"""Resident memory of an agent process per key store backend, as one JSON line.

Each backend is measured in its own fresh Python process: import the agent,
open the key store, create a key and sign once, then read VmRSS from
/proc/self/status. The TPM backend signs in a swtpm started for the purpose
(loopback only). Run from the repository root with the interpreter to measure:

    .venv/bin/python tests/bench/keystore_memory.py
    /usr/bin/python3 tests/bench/keystore_memory.py
"""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: One process imports the agent and signs once: seconds, not minutes.
MEASURE_TIMEOUT = 120
#: What "the agent" is: the modules ``outpost-agent run`` and ``enroll`` load.
AGENT_MODULES = ("agent.cli", "agent.enrollment.enroll", "agent.tunnel.client", "agent.identity.select")

MEASURE = """
import importlib, json, sys
from pathlib import Path
for name in {modules!r}:
    importlib.import_module(name)
from agent.identity.select import KeyStoreSettings, open_keystore
store = open_keystore(Path({state!r}), KeyStoreSettings(backend={backend!r}, tcti={tcti!r}))
store.create()
store.sign(b"memory benchmark")
store.close()
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({{
    "backend": store.backend,
    "vmrss_kib": int(status["VmRSS"].split()[0]),
    "tpm2_pytss_loaded": "tpm2_pytss" in sys.modules,
}}))
"""


def measure(backend: str, tcti: str = "device:/dev/tpmrm0") -> dict:
    with tempfile.TemporaryDirectory() as state:
        program = MEASURE.format(modules=AGENT_MODULES, state=state, backend=backend, tcti=tcti)
        result = subprocess.run(
            [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=MEASURE_TIMEOUT
        )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_tpm() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.agent.identity.swtpm_harness import SWTPM, started_swtpm

    if SWTPM is None:
        return {"error": "swtpm is not installed"}
    with tempfile.TemporaryDirectory() as workdir:
        swtpm = started_swtpm(Path(workdir))
        try:
            return measure("tpm", swtpm.tcti)
        finally:
            swtpm.stop()


def versions() -> dict:
    found = {"python": platform.python_version()}
    for module in ("cryptography", "aiohttp", "tpm2_pytss"):
        try:
            found[module] = importlib.import_module(module).__version__
        except (ImportError, AttributeError):
            try:
                from importlib.metadata import version

                found[module] = version(module.replace("_", "-"))
            except Exception:
                found[module] = None
    return found


def main() -> None:
    print(json.dumps({"software": measure("software"), "tpm": measure_tpm(), "versions": versions()}, sort_keys=True))


if __name__ == "__main__":
    main()
