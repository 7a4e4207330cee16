"""Telling systemd how the agent is doing: readiness, status, watchdog, journal.

Every function here is optional integration: outside systemd (a developer's
shell, a test, another init) each one does nothing and says so by returning
False or None. Notifications are the sd_notify datagram protocol
(sd_notify(3)) spoken directly on ``$NOTIFY_SOCKET``: a few lines and no
library (python3-systemd's ``systemd.daemon`` would stay resident, about
0.8 MiB, for the same datagrams). The journal handler of python3-systemd is
imported only when logging goes to the journal.

This module is the systemd edge of the process: reading ``NOTIFY_SOCKET``,
``WATCHDOG_USEC`` and ``JOURNAL_STREAM`` is its job, as reading flags is the
CLI's.

Readiness, as the agent uses it: ``READY=1`` once the agent has done what it
can do alone and is either connected or waiting on something outside it (a
token file, the network, the controller), with the status line saying which.
A gateway that boots with no network is therefore "active", not stuck in
"activating" until its start timeout kills it (docs/packaging.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar


def __getattr__(name: str) -> Any:
    """``_JournalHandler``: python3-systemd's, imported on first use (None where it is not installed)."""
    if name != "_JournalHandler":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from systemd.journal import JournalHandler
    except ImportError:  # pragma: no cover - depends on the installed packages
        JournalHandler = None
    globals()[name] = JournalHandler
    return JournalHandler


def _journal_handler_class() -> Any:
    # A module attribute once resolved (tests replace it); resolved here on first use.
    return globals()["_JournalHandler"] if "_JournalHandler" in globals() else __getattr__("_JournalHandler")

DEFAULT_IDENTIFIER = "outpost-agent"
# A notification is one datagram to a local socket; if systemd's queue is so
# full that it does not drain in a second, the manager is wedged and blocking
# the agent's event loop longer would not help it.
NOTIFY_SEND_TIMEOUT_SECONDS = 1.0
# sd_watchdog_enabled(3) advises pinging at half the interval, so that one
# late ping still lands before the manager's deadline.
WATCHDOG_PING_FRACTION = 0.5
MICROSECONDS_PER_SECOND = 1_000_000

#: Values of the ``OUTPOST_EVENT`` journal field: the moments of a gateway's
#: life an operator looks for (``journalctl OUTPOST_EVENT=disconnected``).
EVENT_ENROLLED = "enrolled"
EVENT_CONNECTED = "connected"
EVENT_DISCONNECTED = "disconnected"
EVENT_RENEWED = "renewed"

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def under_systemd() -> bool:
    """True when systemd started this process (a notify socket or journal stream is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("JOURNAL_STREAM"))


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None without a watchdog.

    A ``WATCHDOG_PID`` naming another process means the watchdog is not ours
    (sd_watchdog_enabled(3)), so that is None too.
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / MICROSECONDS_PER_SECOND * WATCHDOG_PING_FRACTION


def notify_ready(status: str) -> bool:
    """Tell systemd start-up is complete (``Type=notify``), with a one-line status."""
    return _notify(f"READY=1\nSTATUS={_one_line(status)}")


def notify_status(status: str) -> bool:
    """Replace the status line ``systemctl status`` shows."""
    return _notify(f"STATUS={_one_line(status)}")


def notify_watchdog() -> bool:
    """Ping the watchdog; call every :func:`watchdog_interval` seconds from the event loop."""
    return _notify("WATCHDOG=1")


async def feed_watchdog(interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled; a stalled event loop stops pinging."""
    while True:
        notify_watchdog()
        await asyncio.sleep(interval)


async def watchdog_fed(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` while this event loop pings the watchdog.

    systemd arms a unit's watchdog at its first ``WATCHDOG=1``, before
    ``READY=1`` too (seen on systemd 252; without a ping it waits for
    READY), so pinging from the start makes the watchdog catch a hang in
    start-up as well, long before ``TimeoutStartSec``.
    """
    interval = watchdog_interval()
    if interval is None:
        return await awaitable
    feeder = asyncio.ensure_future(feed_watchdog(interval))
    try:
        return await awaitable
    finally:
        feeder.cancel()


def notify_stopping() -> bool:
    """Tell systemd a clean shutdown has begun, so it waits instead of presuming a hang."""
    return _notify("STOPPING=1")


def configure_logging(level: int | str, identifier: str = DEFAULT_IDENTIFIER) -> logging.Handler:
    """Route the root logger to the journal under systemd, to stderr otherwise.

    Under systemd with python3-systemd, records go to journald with their own
    fields (``PRIORITY``, ``LOGGER``, ``CODE_FILE``..., and those of
    :func:`journal_fields`) and ``SYSLOG_IDENTIFIER=identifier``, so
    ``journalctl -t outpost-agent`` finds them. Under systemd without it, stderr is already the journal, which adds
    its own timestamps. Returns the handler installed, replacing any earlier one.
    """
    handler: logging.Handler
    journal_handler = _journal_handler_class() if under_systemd() else None
    if journal_handler is not None:
        handler = journal_handler(SYSLOG_IDENTIFIER=identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
    elif under_systemd():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def journal_fields(event: str, *, identity: str | None = None, relay: str | None = None) -> dict[str, str]:
    """The ``extra=`` of the log call that marks ``event`` (one of the ``EVENT_*`` names).

    Gives ``OUTPOST_EVENT``, and ``OUTPOST_IDENTITY`` and ``OUTPOST_RELAY``
    when known. python3-systemd's JournalHandler sends a record's extra
    attributes as journal fields (``journalctl OUTPOST_IDENTITY=spiffe://...``);
    every other handler ignores them, so the same call logs plain text where
    python3-systemd is absent or outside systemd.
    """
    fields = {"OUTPOST_EVENT": event}
    if identity is not None:
        fields["OUTPOST_IDENTITY"] = identity
    if relay is not None:
        fields["OUTPOST_RELAY"] = relay
    return fields


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split())


def _notify(message: str) -> bool:
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    return _send_notify_datagram(message, os.environ["NOTIFY_SOCKET"])


def _send_notify_datagram(message: str, address: str) -> bool:
    """The sd_notify protocol: one datagram of ``KEY=VALUE`` lines to ``address``."""
    if address.startswith("@"):
        # A leading '@' names a socket in the abstract namespace.
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        _log.warning("ignoring NOTIFY_SOCKET %r: neither a path nor an abstract socket", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT_SECONDS)
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as error:
        _log.warning("could not notify the service manager: %s", error)
        return False
    return True
