"""Resident memory of an agent process per key store backend, as one JSON line.

Each backend is measured in its own fresh Python process: import the agent,
open the key store, create a key and sign once, then read VmRSS from
/proc/self/status. The TPM backend signs in a swtpm started for the purpose
(loopback only), twice: as an agent that enrolled earlier (a fresh process
finds the key file and signs, the steady state: ``tpm``) and through
tpm2-pytss for everything (``tpm_pytss``, how the key store signed before).
Each also reports the median time of ``SIGNATURES`` signatures, the cost
at every tunnel start. Run from the repository root with the interpreter to measure:

    .venv/bin/python tests/bench/keystore_memory.py
    /usr/bin/python3 tests/bench/keystore_memory.py
"""

from __future__ import annotations

import contextlib
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

#: Signatures timed per backend: enough for a median on a busy machine, seconds on swtpm.
SIGNATURES = 30

MEASURE = """
import importlib, json, statistics, sys, time
from pathlib import Path
for name in {modules!r}:
    importlib.import_module(name)
from agent.identity.select import KeyStoreSettings, open_keystore
store = open_keystore(Path({state!r}), KeyStoreSettings(backend={backend!r}, tcti={tcti!r}))
if {pytss!r}:
    from agent.identity.tpm_tss import TssKeyStore
    store = TssKeyStore(Path({state!r}), {tcti!r})
if not store.exists():
    store.create()
store.sign(b"memory benchmark")
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
times = []
for _ in range({signatures}):
    started = time.perf_counter()
    store.sign(b"tunnel challenge")
    times.append(time.perf_counter() - started)
store.close()
print(json.dumps({{
    "backend": store.backend,
    "vmrss_kib": int(status["VmRSS"].split()[0]),
    "tpm2_pytss_loaded": "tpm2_pytss" in sys.modules,
    "sign_ms_median": round(statistics.median(times) * 1000, 2),
}}))
"""


def measure(backend: str, tcti: str = "device:/dev/tpmrm0", pytss: bool = False, state: str | None = None) -> dict:
    with contextlib.ExitStack() as stack:
        if state is None:
            state = stack.enter_context(tempfile.TemporaryDirectory())
        program = MEASURE.format(modules=AGENT_MODULES, state=state, backend=backend, tcti=tcti, pytss=pytss,
                                 signatures=SIGNATURES)
        result = subprocess.run(
            [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=MEASURE_TIMEOUT
        )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_tpm() -> dict:
    """The enrolled agent (key made in an earlier process) and the tpm2-pytss path, on one swtpm."""
    sys.path.insert(0, str(ROOT))
    from tests.agent.identity.swtpm_harness import SWTPM, started_swtpm

    if SWTPM is None:
        return {"tpm": {"error": "swtpm is not installed"}}
    with tempfile.TemporaryDirectory() as workdir:
        swtpm = started_swtpm(Path(workdir))
        try:
            state = str(Path(workdir) / "state")
            measure("tpm", swtpm.tcti, state=state)  # enrollment: creates the key
            return {"tpm": measure("tpm", swtpm.tcti, state=state),
                    "tpm_pytss": measure("tpm", swtpm.tcti, pytss=True, state=state)}
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
    print(json.dumps({"software": measure("software"), **measure_tpm(), "versions": versions()}, sort_keys=True))


if __name__ == "__main__":
    main()
