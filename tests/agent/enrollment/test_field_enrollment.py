"""``outpost-agent run`` on an unenrolled gateway: find a token file, enroll, retry, or wait.

Against the real ``outpost-controller serve`` on 127.0.0.1, with token files
in temporary directories standing in for /boot/firmware and /etc/outpost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.enrollment.enroll import enroll_async
from agent.enrollment.field import (
    POLL_INTERVAL,
    REFUSED_NOTE,
    EnrollmentSchedule,
    find_token,
    retire_token,
    save_refusal,
    wait_for_enrollment,
)
from agent.identity.select import KeyStoreSettings
from agent.identity.state import StateDir
from agent.tunnel.backoff import Backoff
from tests.e2e.harness import Controller

# Enrollment on loopback takes well under a second; this bounds every run.
RUN_TIMEOUT = 30.0
# Polls fast so a test sees many of them; the agent's own default is seconds.
TEST_POLL = 0.05
# How many polls a "never tried again" check watches.
WATCHED_POLLS = 20
# One enrollment on loopback, on a loaded machine.
ENROLL_SLACK = 10.0


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    running = Controller(tmp_path_factory.mktemp("field-controller"))
    try:
        yield running
    finally:
        running.process.stop()


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notification socket."""
    folder = tempfile.mkdtemp(prefix="sdn-")  # AF_UNIX paths are short: not tmp_path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(folder, "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(folder)


def notifications(sock: socket.socket) -> list[dict[str, str]]:
    found = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return found
        found.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


def token_for(controller: Controller, name: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    controller.ctl("identity", "create", name, "--token-out", str(path))
    return path


def config_for(tmp_path: Path, *token_paths: Path) -> AgentConfig:
    return AgentConfig(state_dir=tmp_path / "state", keystore=KeyStoreSettings(backend="software"),
                       token_paths=tuple(token_paths))


class CountingEnroll:
    """The real enrollment, counting how often the controller is asked."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return await enroll_async(*args)


def fast_schedule(config: AgentConfig, initial: float = 0.05) -> EnrollmentSchedule:
    return EnrollmentSchedule(missing_reason="no token", poll_interval=TEST_POLL,
                              backoff=Backoff(initial=initial, cap=initial * 2, rng=random.Random(1)))


async def until(predicate, what: str, timeout: float = RUN_TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached within {timeout} s"
        await asyncio.sleep(TEST_POLL / 2)


def test_a_token_in_a_later_place_enrolls_the_gateway_and_is_deleted(controller: Controller, tmp_path: Path) -> None:
    boot_token = token_for(controller, "field-1", tmp_path / "boot" / "outpost-enroll.token")
    config = config_for(tmp_path, tmp_path / "state" / "enroll.token", tmp_path / "etc" / "enroll.token", boot_token)

    identity = asyncio.run(asyncio.wait_for(wait_for_enrollment(config), RUN_TIMEOUT))

    assert identity is not None and identity.name == "field-1"
    assert StateDir(config.state_dir).load().uri == identity.uri
    assert not boot_token.exists(), "a redeemed token is retired"
    assert not (config.state_dir / REFUSED_NOTE).exists()


def test_without_a_token_it_reports_ready_and_waiting_and_stops_cleanly(
    tmp_path: Path, notify: socket.socket
) -> None:
    config = config_for(tmp_path, tmp_path / "etc" / "enroll.token")

    async def scenario() -> Any:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(wait_for_enrollment(config, stop=stop))
        await asyncio.sleep(0.3)
        stop.set()
        return await asyncio.wait_for(waiting, RUN_TIMEOUT)

    assert asyncio.run(scenario()) is None
    sent = notifications(notify)
    assert sent[0] == {
        "READY": "1",
        "STATUS": f"waiting for enrollment: no token file in {tmp_path / 'etc' / 'enroll.token'}; "
                  "copy the token file from central ops to one of them",
    }
    assert sent[-1] == {"STOPPING": "1"}
    assert not StateDir(config.state_dir).is_enrolled()


def test_a_refused_token_stays_in_place_is_not_retried_even_after_a_restart_and_a_new_file_enrolls(
    controller: Controller, tmp_path: Path, notify: socket.socket
) -> None:
    token = token_for(controller, "field-2", tmp_path / "etc" / "enroll.token")
    asyncio.run(enroll_async(token, tmp_path / "elsewhere", KeyStoreSettings(backend="software")))
    used = token.read_bytes()
    config = config_for(tmp_path, token)
    counting = CountingEnroll()

    async def wait_refused() -> None:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(
            wait_for_enrollment(config, stop=stop, enroll=counting, schedule=fast_schedule(config)))
        await until(lambda: (config.state_dir / REFUSED_NOTE).exists(), "the refusal note")
        await asyncio.sleep(TEST_POLL * WATCHED_POLLS)
        stop.set()
        assert await asyncio.wait_for(waiting, RUN_TIMEOUT) is None

    asyncio.run(wait_refused())
    asyncio.run(wait_refused())  # a restart: the note keeps the same file from being offered again

    assert counting.calls == 1
    assert token.read_bytes() == used, "a refused token is left where the technician put it"
    assert not StateDir(config.state_dir).is_enrolled()
    statuses = [n.get("STATUS", "") for n in notifications(notify)]
    assert "waiting for enrollment: This enrollment token was already used; ask central ops for a new one." in statuses

    async def replace_and_enroll() -> Any:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(
            wait_for_enrollment(config, stop=stop, enroll=counting, schedule=fast_schedule(config)))
        await asyncio.sleep(TEST_POLL * 4)
        token_for(controller, "field-3", tmp_path / "new.token").replace(token)
        return await asyncio.wait_for(waiting, RUN_TIMEOUT)

    identity = asyncio.run(replace_and_enroll())

    assert identity is not None and identity.name == "field-3"
    assert counting.calls == 2
    assert not token.exists() and not (config.state_dir / REFUSED_NOTE).exists()


def test_an_unreachable_controller_is_retried_with_backoff_and_the_token_kept(tmp_path: Path, notify: socket.socket) -> None:
    doomed = Controller(tmp_path / "doomed")
    try:
        token = token_for(doomed, "field-4", tmp_path / "etc" / "enroll.token")
    finally:
        doomed.process.stop()
    config = config_for(tmp_path, token)
    counting = CountingEnroll()

    async def scenario() -> Any:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(
            wait_for_enrollment(config, stop=stop, enroll=counting, schedule=fast_schedule(config)))
        await until(lambda: counting.calls >= 2, "a second attempt")
        stop.set()
        return await asyncio.wait_for(waiting, RUN_TIMEOUT)

    assert asyncio.run(scenario()) is None
    assert token.exists() and not (config.state_dir / REFUSED_NOTE).exists()
    statuses = [n.get("STATUS", "") for n in notifications(notify)]
    waiting = [s for s in statuses if s.startswith("waiting for enrollment: ")]
    assert waiting and "could not reach the controller" in waiting[0], statuses


def test_a_token_refused_on_a_fresh_gateway_is_remembered_in_the_state_directory_it_creates(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.agent.enrollment.fake_controller import FakeController, TestCA

    fake = FakeController(tmp_path / "fake", TestCA()).start()
    try:
        token = tmp_path / "etc" / "enroll.token"
        token.parent.mkdir()
        token.write_text(fake.token(ttl=-60) + "\n")  # expired by the controller's time: refused before any key exists
        config = config_for(tmp_path, token)
        assert not config.state_dir.exists()

        async def scenario() -> None:
            stop = asyncio.Event()
            waiting = asyncio.ensure_future(wait_for_enrollment(config, stop=stop, schedule=fast_schedule(config)))
            await until(lambda: (config.state_dir / REFUSED_NOTE).exists(), "the refusal note")
            stop.set()
            assert await asyncio.wait_for(waiting, RUN_TIMEOUT) is None

        with caplog.at_level(logging.WARNING):
            asyncio.run(scenario())
    finally:
        fake.stop()
    assert "this token expired on" in json.loads((config.state_dir / REFUSED_NOTE).read_text())["reason"]
    assert not any("cannot record" in r.getMessage() for r in caplog.records)
    assert (config.state_dir.stat().st_mode & 0o777) == 0o700
    assert not StateDir(config.state_dir).is_enrolled() and token.exists()


def test_a_refused_token_in_the_state_directory_does_not_hide_a_new_one_on_the_boot_partition(
        controller: Controller, tmp_path: Path) -> None:
    taken = token_for(controller, "field-5", tmp_path / "state" / "enroll.token")  # moved there at boot
    asyncio.run(enroll_async(taken, tmp_path / "elsewhere", KeyStoreSettings(backend="software")))
    boot = tmp_path / "boot" / "outpost-enroll.token"
    boot.parent.mkdir()
    config = config_for(tmp_path, taken, tmp_path / "etc" / "enroll.token", boot)

    async def scenario() -> tuple[Any, float]:
        stop = asyncio.Event()
        # The agent's own poll interval: the documented bound for noticing a new file.
        waiting = asyncio.ensure_future(wait_for_enrollment(config, stop=stop))
        await until(lambda: (config.state_dir / REFUSED_NOTE).exists(), "the refusal of the used token")
        token_for(controller, "field-6", tmp_path / "new.token").replace(boot)
        dropped = asyncio.get_running_loop().time()
        identity = await asyncio.wait_for(waiting, RUN_TIMEOUT)
        return identity, asyncio.get_running_loop().time() - dropped

    identity, elapsed = asyncio.run(scenario())

    assert identity is not None and identity.name == "field-6"
    assert elapsed < POLL_INTERVAL + ENROLL_SLACK, f"the new token waited {elapsed:.1f} s"
    assert not boot.exists()


def test_once_a_later_token_enrolls_the_refused_copy_in_the_state_directory_goes_and_a_refused_file_elsewhere_stays(
        controller: Controller, tmp_path: Path) -> None:
    copy = token_for(controller, "field-9", tmp_path / "state" / "enroll.token")  # moved there at boot
    etc = token_for(controller, "field-10", tmp_path / "etc" / "enroll.token")  # the technician's
    for used in (copy, etc):
        asyncio.run(enroll_async(used, tmp_path / f"elsewhere-{used.parent.name}", KeyStoreSettings(backend="software")))
    etc_text = etc.read_text()
    boot = tmp_path / "boot" / "outpost-enroll.token"
    config = config_for(tmp_path, copy, etc, boot)

    async def scenario() -> Any:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(wait_for_enrollment(config, stop=stop, schedule=fast_schedule(config)))
        await until(lambda: json.loads((config.state_dir / REFUSED_NOTE).read_text())["path"] == str(etc)
                    if (config.state_dir / REFUSED_NOTE).exists() else False, "both used tokens refused")
        token_for(controller, "field-11", boot)
        return await asyncio.wait_for(waiting, RUN_TIMEOUT)

    identity = asyncio.run(scenario())

    assert identity is not None and identity.name == "field-11"
    assert not copy.exists() and not (config.state_dir / REFUSED_NOTE).exists()
    assert etc.read_text() == etc_text, "a refused token outside the state directory is the technician's"
    assert not boot.exists()


def test_an_agent_enrolled_by_hand_removes_the_refused_copy_in_its_state_directory_at_start(
        controller: Controller, tmp_path: Path) -> None:
    copy = token_for(controller, "field-12", tmp_path / "state" / "enroll.token")
    asyncio.run(enroll_async(copy, tmp_path / "elsewhere", KeyStoreSettings(backend="software")))
    save_refusal(tmp_path / "state", find_token([copy]), "This enrollment token was already used")
    # The technician then enrolled by hand with a new token.
    asyncio.run(enroll_async(token_for(controller, "field-13", tmp_path / "new.token"), tmp_path / "state",
                             KeyStoreSettings(backend="software")))
    run_enrolled_until(tmp_path, [copy], f"removed the refused token {copy}: this gateway is enrolled")
    assert not copy.exists() and not (tmp_path / "state" / REFUSED_NOTE).exists()
    assert StateDir(tmp_path / "state").load().name == "field-13"


def run_enrolled_until(tmp_path: Path, paths: list[Path], line: str) -> None:
    """``outpost-agent run`` on the gateway enrolled in ``tmp_path/state``, looking in ``paths``, until it logs ``line``."""
    import sys

    from tests.e2e.harness import Process

    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[keystore]\nbackend = "software"\n'
                      f'[enrollment]\ntoken_paths = {json.dumps([str(p) for p in paths])}\n')
    agent = Process([sys.executable, "-m", "agent.cli", "run", "--config", str(config)])
    try:
        agent.wait_for_line(line)
    finally:
        agent.stop()


def test_a_token_left_behind_by_a_stop_after_enrollment_is_retired_at_the_next_start(
        controller: Controller, tmp_path: Path) -> None:
    mine = token_for(controller, "field-7", tmp_path / "boot" / "outpost-enroll.token")
    # Enrolled, then stopped before the token was retired: the state says enrolled, the token is still there.
    asyncio.run(enroll_async(mine, tmp_path / "state", KeyStoreSettings(backend="software")))
    other = token_for(controller, "field-8", tmp_path / "etc" / "enroll.token")
    run_enrolled_until(tmp_path, [other, mine], f"removed the token {mine}: this gateway is enrolled from it as ")
    assert not mine.exists()
    assert other.exists(), "a token for another identity is not this agent's to remove"


def test_a_used_token_that_cannot_be_removed_gets_a_true_sentence(tmp_path: Path) -> None:
    # A directory cannot be unlinked, nor renamed onto a non-empty one: both ways out fail.
    stuck = tmp_path / "enroll.token"
    (stuck / "inside").mkdir(parents=True)
    (tmp_path / "enroll.token.used" / "inside").mkdir(parents=True)

    problem = retire_token(stuck)

    assert problem is not None and problem.startswith(f"enrolled, but the used token {stuck} could not be removed (")
    assert problem.endswith("delete it by hand (until it expires, the controller accepts it again from this "
                            "gateway's key)")


def test_an_enrolled_start_with_nothing_left_to_tidy_does_not_load_the_enrollment_code(
        controller: Controller, tmp_path: Path) -> None:
    """Retiring leftovers at start needs the enrollment code only when a token file or a refusal note is there."""
    import subprocess
    import sys

    from tests.agent.cli_helpers import CLI_TIMEOUT, ROOT

    token, note = tmp_path / "boot" / "outpost-enroll.token", tmp_path / "state" / REFUSED_NOTE
    asyncio.run(enroll_async(token_for(controller, "field-14", tmp_path / "by-hand.token"), tmp_path / "state",
                             KeyStoreSettings(backend="software")))
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.config import AgentConfig\n"
        "from agent.identity.state import StateDir\n"
        "from agent.tunnel.runner import tidy_enrolled\n"
        f"config = AgentConfig(state_dir=Path({str(tmp_path / 'state')!r}), token_paths=(Path({str(token)!r}),))\n"
        "tidy_enrolled(config, StateDir(config.state_dir))\n"
        "print('agent.enrollment.field' in sys.modules)\n"
    )

    def loaded() -> str:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                                cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert loaded() == "False"
    note.write_text("{}")
    assert loaded() == "True"
    assert not note.exists(), "an enrolled gateway removes the refusal note"
    token.parent.mkdir()
    token.write_text("not a token")
    assert loaded() == "True"
    assert token.exists(), "a file that is not this gateway's token stays"
