"""shared.service_manager speaks sd_notify to a real AF_UNIX datagram socket.

Each behaviour is checked twice where it matters: through python3-systemd's
``systemd.daemon.notify`` when it is installed, and through the module's own
datagram sender, which is what runs on a gateway without python3-systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import service_manager

# A notification is delivered synchronously to a local socket; a second is
# ample, and bounds every wait in these tests.
RECEIVE_TIMEOUT_SECONDS = 1.0
# "Nothing arrives" is checked by waiting this long for a datagram.
SILENCE_SECONDS = 0.2


class NotifyReceiver:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def receive(self, timeout: float = RECEIVE_TIMEOUT_SECONDS) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.fixture
def sender() -> str:
    """The one way of sending: the module's own datagrams (python3-systemd's sender is not used)."""
    return "built-in"


@pytest.fixture
def path_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    # AF_UNIX paths are limited to 108 bytes, so a short directory, not tmp_path.
    folder = tempfile.mkdtemp(prefix="sdn-")
    address = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        yield NotifyReceiver(sock, address)
    finally:
        sock.close()
        shutil.rmtree(folder)


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyReceiver]:
    name = f"outpost-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield NotifyReceiver(sock, "@" + name)
    finally:
        sock.close()


def test_ready_sends_ready_and_the_status_line(sender: str, path_receiver: NotifyReceiver) -> None:
    assert service_manager.notify_ready("connected to relay-1") is True
    assert path_receiver.receive() == {"READY": "1", "STATUS": "connected to relay-1"}


def test_ready_reaches_an_abstract_namespace_socket(sender: str, abstract_receiver: NotifyReceiver) -> None:
    assert service_manager.notify_ready("up") is True
    assert abstract_receiver.receive() == {"READY": "1", "STATUS": "up"}


def test_status_watchdog_and_stopping_each_send_their_own_assignment(
    sender: str, path_receiver: NotifyReceiver
) -> None:
    assert service_manager.notify_status("reconnecting in 4 s") is True
    assert path_receiver.receive() == {"STATUS": "reconnecting in 4 s"}
    assert service_manager.notify_watchdog() is True
    assert path_receiver.receive() == {"WATCHDOG": "1"}
    assert service_manager.notify_stopping() is True
    assert path_receiver.receive() == {"STOPPING": "1"}


def test_a_newline_in_a_status_cannot_inject_another_assignment(
    sender: str, path_receiver: NotifyReceiver
) -> None:
    assert service_manager.notify_status("bad\nREADY=1") is True
    assert path_receiver.receive() == {"STATUS": "bad READY=1"}


def test_without_a_notify_socket_nothing_is_sent_and_false_returned(
    sender: str, path_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert service_manager.notify_ready("up") is False
    assert service_manager.notify_watchdog() is False
    assert path_receiver.receive(timeout=SILENCE_SECONDS) is None


def test_a_socket_nobody_listens_on_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = os.path.join(tempfile.gettempdir(), f"no-such-notify-{secrets.token_hex(8)}")
    monkeypatch.setenv("NOTIFY_SOCKET", missing)
    assert service_manager.notify_ready("up") is False
    assert not Path(missing).exists()


def test_a_relative_notify_socket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify")
    assert service_manager.notify_status("x") is False


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("30000000", 15.0), ("1000000", 0.5), ("0", None), ("", None), ("soon", None), ("-5", None)],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    usec: str, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert service_manager.watchdog_interval() == expected


def test_no_watchdog_without_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert service_manager.watchdog_interval() is None


def test_a_watchdog_meant_for_another_process_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert service_manager.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert service_manager.watchdog_interval() == 15.0


@pytest.mark.parametrize("variable", ["NOTIFY_SOCKET", "JOURNAL_STREAM"])
def test_under_systemd_when_either_variable_is_set(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert service_manager.under_systemd() is False
    monkeypatch.setenv(variable, "8:12345" if variable == "JOURNAL_STREAM" else "@x")
    assert service_manager.under_systemd() is True


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_logging_outside_systemd_goes_to_stderr(
    restore_root_logger: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    handler = service_manager.configure_logging(logging.INFO)
    assert logging.getLogger().handlers == [handler]
    logging.getLogger("agent.test").info("tunnel up")
    logging.getLogger("agent.test").debug("not shown at INFO")
    err = capsys.readouterr().err
    assert "INFO agent.test: tunnel up" in err
    assert "not shown" not in err


@pytest.fixture
def under_journal(restore_root_logger: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by systemd with python3-systemd at hand: logging will go to the journal."""
    if service_manager._JournalHandler is None:
        pytest.skip("python3-systemd is not installed here")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")


def test_logging_under_systemd_goes_to_the_journal_with_the_identifier(under_journal: None) -> None:
    handler = service_manager.configure_logging("DEBUG")
    assert isinstance(handler, service_manager._JournalHandler)
    assert handler._extra["SYSLOG_IDENTIFIER"] == "outpost-agent"
    assert logging.getLogger().level == logging.DEBUG


def test_logging_under_systemd_without_the_library_writes_plain_lines_to_stderr(
    restore_root_logger: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(service_manager, "_JournalHandler", None)
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    service_manager.configure_logging(logging.WARNING)
    logging.getLogger("agent.test").warning("clock is 3 min off")
    # Event fields are the journal's: a plain line stays as it is.
    logging.getLogger("agent.test").warning(
        "tunnel closed", extra=service_manager.journal_fields(service_manager.EVENT_DISCONNECTED, relay="wss://r"))
    # journald stamps each line itself, so no timestamp of our own.
    assert capsys.readouterr().err == "WARNING agent.test: clock is 3 min off\nWARNING agent.test: tunnel closed\n"


def test_journal_fields_name_the_event_and_only_what_is_known() -> None:
    assert service_manager.journal_fields(service_manager.EVENT_CONNECTED, identity="spiffe://d/t/gw1",
                                          relay="wss://relay-1/v1/tunnel") == {
        "OUTPOST_EVENT": "connected", "OUTPOST_IDENTITY": "spiffe://d/t/gw1", "OUTPOST_RELAY": "wss://relay-1/v1/tunnel",
    }
    assert service_manager.journal_fields(service_manager.EVENT_ENROLLED, identity="spiffe://d/t/gw1") == {
        "OUTPOST_EVENT": "enrolled", "OUTPOST_IDENTITY": "spiffe://d/t/gw1",
    }


def test_the_journal_handler_sends_the_event_fields_a_log_call_passes_as_extra(under_journal: None) -> None:
    handler = service_manager.configure_logging(logging.INFO)
    sent: list[tuple[str, dict[str, object]]] = []
    # No journald on a development machine: the handler's own sender is
    # swapped for one that keeps what it would send (the booted-container
    # test, tests/packaging/test_boot_watchdog.py, reads the real journal).
    handler.send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))  # journal.send(MESSAGE, **fields)
    logging.getLogger("agent.test").info(
        "tunnel up to %s", "wss://relay-1", extra=service_manager.journal_fields(
            service_manager.EVENT_CONNECTED, identity="spiffe://d/t/gw1", relay="wss://relay-1"))
    [(message, fields)] = sent
    assert message == "tunnel up to wss://relay-1"
    assert (fields["OUTPOST_EVENT"], fields["OUTPOST_IDENTITY"], fields["OUTPOST_RELAY"]) == (
        "connected", "spiffe://d/t/gw1", "wss://relay-1")
    assert fields["SYSLOG_IDENTIFIER"] == "outpost-agent"


def test_watchdog_fed_pings_while_it_awaits_and_stops_after(
    sender: str, path_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 0.1 s pings, while a start awaits three of them: counted as they arrive, not within a fixed time
    # (a slow machine sends fewer in one), and bounded by the time the start took.
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    interval = 0.1

    async def slow_start() -> str:
        for _ in range(3):
            assert await asyncio.to_thread(path_receiver.receive) == {"WATCHDOG": "1"}
        return "started"

    started = time.monotonic()
    assert asyncio.run(service_manager.watchdog_fed(slow_start())) == "started"
    took = time.monotonic() - started
    pings = 3
    while path_receiver.receive(timeout=SILENCE_SECONDS) == {"WATCHDOG": "1"}:  # sent before the stop
        pings += 1
    assert pings <= took / interval + 2, f"{pings} pings in {took:.2f} s: more often than every {interval} s"
    assert path_receiver.receive(timeout=SILENCE_SECONDS) is None


def test_watchdog_fed_sends_nothing_without_a_watchdog(
    sender: str, path_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert asyncio.run(service_manager.watchdog_fed(asyncio.sleep(0.05, result=7))) == 7
    assert path_receiver.receive(timeout=SILENCE_SECONDS) is None
