"""``outpostctl audit`` filters, paging and ``--follow``; ``outpostctl connections``; their bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.errors import EXIT_DATAERR, EXIT_USAGE
from tests.outpostctl.harness import ROOT, Ctl, RunningController, stop_process, subprocess_env

#: A followed event reaches the follower within this (it polls every half second).
FOLLOW_SECONDS = 15.0


def test_connections_and_filtered_audit_answer_in_json_and_in_a_table(ctl: Ctl, tmp_path: Path) -> None:
    ctl.ok("identity", "create", "gw-audit-filter", "--token-out", str(tmp_path / "t.token"))
    page = json.loads(ctl.ok("audit", "--identity", "gw-audit-filter", "--since", "1h", "--json").out)
    assert [e["event"] for e in page["events"]] == ["identity_created", "token_created"]
    assert {e["fields"]["actor"] for e in page["events"]} == {"admin"}
    correlation = page["events"][0]["fields"]["correlation"]
    one = json.loads(ctl.ok("audit", "--correlation", correlation, "--json").out)
    assert [e["event"] for e in one["events"]] == ["identity_created", "token_created"]
    older = json.loads(ctl.ok("audit", "--limit", "1", "--json").out)
    assert older["next_before"] is not None
    before = json.loads(ctl.ok("audit", "--limit", "1", "--before", str(older["next_before"]), "--json").out)
    assert before["events"][0]["id"] < older["events"][0]["id"]
    assert json.loads(ctl.ok("connections", "--json").out)["connections"] == []
    assert ctl.ok("connections", "--denied", "--service", "modbus").out.strip() == "no connections match"


def test_a_bad_time_or_filter_is_one_sentence_and_a_usage_exit(ctl: Ctl) -> None:
    for args, words in [
        (["audit", "--since", "last tuesday"], "is not a time"),
        (["audit", "--since", "nan"], "is not a time"),
        (["connections", "--since", "2999-01-01T00:00:00Z"], "is in the future"),
    ]:
        result = ctl(*args)
        assert result.code == EXIT_USAGE and words in result.err and result.out == "", result
    result = ctl("connections", "--identity", "Gw!")
    assert result.code != 0 and result.err.count("\n") == 1 and "identity" in result.err.lower(), result


def test_follow_streams_new_events_as_json_lines(controller: RunningController, tmp_path: Path) -> None:
    env = subprocess_env(OUTPOSTCTL_CONFIG=str(controller.config_path))
    follower = subprocess.Popen([sys.executable, "-m", "outpostctl", "audit", "--follow", "--json", "--limit", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + FOLLOW_SECONDS
        while not lines and time.monotonic() < deadline:  # the newest event first
            time.sleep(0.1)
        subprocess.run([sys.executable, "-m", "outpostctl", "identity", "create", "gw-followed", "--token-out",
                        str(tmp_path / "f.token")], env=env, cwd=ROOT, check=True, capture_output=True, timeout=30)
        # The two events may reach the follower in two polls: wait for the second, not the first.
        while time.monotonic() < deadline and not any("gw-followed" in line and "token_created" in line
                                                      for line in lines):
            time.sleep(0.1)
    finally:
        stop_process(follower)
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events if e["fields"].get("identity") == "default/gw-followed"] == [
        "identity_created", "token_created"], lines
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})  # each once, in order


def test_audit_verify_exits_zero_on_a_whole_chain_and_names_a_checkpoint_it_does_not_match(ctl: Ctl) -> None:
    report = json.loads(ctl.ok("audit", "verify", "--json").out)
    assert report["ok"] and ctl.ok("audit", "verify").out.startswith("the chain is whole: ")
    result = ctl("audit", "verify", "--checkpoint", "1:" + "0" * 64)
    assert result.code == EXIT_DATAERR, result
    assert result.err.startswith("outpostctl: the audit trail fails verification at event 1: it does not match the "
                                 "checkpoint") and result.err.count("\n") == 1, result
