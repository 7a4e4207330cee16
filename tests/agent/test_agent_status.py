"""``outpost-agent status``: what it says agrees with the tunnel's state, and a closed pipe is no error."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

from agent.identity.state import StateDir
from tests.agent.cli_helpers import CLI_TIMEOUT, ROOT, run_cli
from tests.agent.test_agent_cli import enrolled  # noqa: F401 (fixture)

UTC = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"


def assert_since(text: str, label: str, seconds: int, written_at: float) -> None:
    """``label`` says ``since <UTC> (N s ago)`` with N the age at the write, or the seconds the
    command took after it (a slow start, as under emulation, adds to it)."""
    found = re.search(f"^{label:<13}since {UTC} \\((\\d+) s ago\\)$", text, re.M)
    assert found, text
    assert seconds <= int(found.group(1)) <= seconds + math.ceil(time.time() - written_at), text


def buffered_env() -> dict[str, str]:
    """A shell's environment: stdout into a pipe is block-buffered, so what is printed is
    flushed at exit, where a closed pipe used to surface (PYTHONUNBUFFERED would hide that)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return {**env, "PYTHONPATH": str(ROOT)}


def test_status_into_a_closed_pipe_exits_quietly(enrolled: StateDir) -> None:  # noqa: F811
    # ``outpost-agent status | head -1``, with head already gone: the reader's end is closed before the write.
    enrolled.write_status({"state": "connected", "relay": "wss://relay.example/v1/tunnel"})
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--state", str(enrolled.path)],
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=CLI_TIMEOUT, cwd=ROOT,
                                env=buffered_env())
    finally:
        os.close(writer)
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


def test_status_piped_into_head_prints_one_line_and_no_traceback(enrolled: StateDir) -> None:  # noqa: F811
    command = f"{sys.executable} -m agent.cli status --state {enrolled.path} | head -1"
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=ROOT,
                            env=buffered_env())
    assert result.stdout.startswith("identity:") and result.stdout.count("\n") == 1
    assert result.stderr == ""


def test_a_tunnel_that_is_down_is_not_shown_as_connected(enrolled: StateDir) -> None:  # noqa: F811
    now = time.time()
    enrolled.write_status({"state": "waiting", "connected_since": None, "down_since": now - 20,
                           "last_drop": "tunnel closed: relay restarting", "updated": now})
    text = run_cli("status", "--state", enrolled.path).stdout
    assert "tunnel:      waiting" in text
    assert "connected:" not in text
    assert_since(text, "down:", 20, now)


def test_an_older_agents_stale_connected_since_is_not_shown_beside_waiting(enrolled: StateDir) -> None:  # noqa: F811
    # What an agent before down_since wrote: the time the last tunnel came up, kept after it dropped.
    now = time.time()
    enrolled.write_status({"state": "waiting", "connected_since": now - 58, "updated": now})
    text = run_cli("status", "--state", enrolled.path).stdout
    assert "tunnel:      waiting" in text and "connected:" not in text, text


def test_a_connected_tunnel_shows_since_when(enrolled: StateDir) -> None:  # noqa: F811
    now = time.time()
    enrolled.write_status({"state": "connected", "connected_since": now - 20, "down_since": None, "updated": now})
    text = run_cli("status", "--state", enrolled.path).stdout
    assert_since(text, "connected:", 20, now)  # 40 s of room for a slow start under emulation
    assert "down:" not in text


def test_a_disabled_agent_says_why_and_when_it_asks_again(enrolled: StateDir) -> None:  # noqa: F811
    now = time.time()
    enrolled.write_status({
        "state": "disabled", "next_ask": now + 9 * 60 + 30, "down_since": now - 30,
        "last_error": "the relay at wss://relay.example/v1/tunnel refused this gateway: identity plant-a/pump-1 "
                      "is disabled; ask central ops to enable it (outpostctl identity enable)",
        "updated": now,
    })
    text = run_cli("status", "--state", enrolled.path).stdout
    assert re.search(r"^tunnel:      disabled by central ops; asking again at \d\d:\d\d UTC \(in 9 min\)$",
                     text, re.M), text
    assert "next ask" not in text, "shown in the tunnel line, not again as a raw field"
    assert "last error:  the relay at wss://relay.example/v1/tunnel refused this gateway" in text


def test_any_command_into_a_closed_pipe_exits_without_a_word(tmp_path) -> None:
    # doctor prints its checks and returns; the flush at exit met the closed pipe.
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n\n[keystore]\nbackend = "software"\n')
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--config", str(config)],
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=CLI_TIMEOUT, cwd=ROOT,
                                env=buffered_env())
    finally:
        os.close(writer)
    assert "BrokenPipe" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


def test_a_connected_tunnel_says_what_it_runs_on_and_a_dropped_one_does_not(enrolled: StateDir) -> None:  # noqa: F811
    now = time.time()
    relay = "wss://relay.example/v1/tunnel"
    enrolled.write_status({"state": "connected", "relay": relay, "transport": "tls", "aiohttp_loaded": False,
                           "connected_since": now - 5, "updated": now})
    text = run_cli("status", "--state", enrolled.path).stdout
    assert f"relay:       {relay} (TLS, ALPN outpost/1)" in text, text
    assert "aiohttp" not in text  # a diagnostic of status.json, not a line for the person reading this
    enrolled.write_status({"state": "connecting", "relay": relay, "transport": "websocket", "down_since": now - 5,
                           "updated": now})
    text = run_cli("status", "--state", enrolled.path).stdout
    assert f"relay:       {relay}\n" in text, text
