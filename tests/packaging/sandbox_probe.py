"""Stands in for ``outpost-agent run`` inside the agent's own unit and sandbox.

Run by the booted container's outpost-agent.service (a drop-in swaps the
ExecStart), it exercises what the agent will need there, on Debian's own
python3-* packages: the imports, an ECDSA signature, a TLS context, a loopback
connection, the journal and sd_notify through shared.service_manager; then it
records what it found in the state directory and keeps pinging the watchdog.
"""

import asyncio
import json
import logging
import os
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, "/usr/lib/outpost-agent")

from shared import service_manager  # noqa: E402

RESULT = Path("/var/lib/outpost-agent/sandbox-probe.json")
# The unit's watchdog allows 60 s; stop pinging (and let systemd act) only at poweroff.
MAX_RUN_SECONDS = 600


def can_write(path: str) -> bool:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        os.unlink(path)
        return True
    except OSError:
        return False


async def loopback_echo() -> bytes:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"outpost\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    server.close()
    return line


def main() -> None:
    import aiohttp
    import cryptography
    import jwt
    import ntplib  # noqa: F401
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    service_manager.configure_logging(logging.INFO)
    key = ec.generate_private_key(ec.SECP256R1())
    signature = key.sign(b"challenge", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))
    try:
        import tpm2_pytss  # noqa: F401
        tpm = "importable"
    except Exception as error:  # noqa: BLE001 - the kind of failure is the finding
        tpm = f"{type(error).__name__}: {error}"
    result = {
        "user": os.getuid(),
        "groups": sorted(os.getgroups()),
        "versions": {"aiohttp": aiohttp.__version__, "cryptography": cryptography.__version__, "jwt": jwt.__version__},
        "tpm2_pytss": tpm,
        "ecdsa_ok": True,
        "tls_context": ssl.create_default_context().minimum_version.name,
        "loopback_echo": asyncio.run(loopback_echo()).decode(),
        "under_systemd": service_manager.under_systemd(),
        "watchdog_interval": service_manager.watchdog_interval(),
        "writable": {p: can_write(p) for p in ("/etc/outpost-probe", "/usr/lib/outpost-agent/probe", "/var/lib/outpost-agent/probe", "/tmp/probe")},
        "home_visible": os.path.exists("/root/apt-install.log"),
    }
    RESULT.write_text(json.dumps(result))
    logging.getLogger("outpost.probe").info("sandbox probe done")
    service_manager.notify_ready("sandbox probe ready")
    interval = service_manager.watchdog_interval() or 1.0
    deadline = time.monotonic() + MAX_RUN_SECONDS
    while time.monotonic() < deadline:
        service_manager.notify_watchdog()
        time.sleep(interval)


main()
