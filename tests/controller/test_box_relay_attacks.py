"""The box as a relay, attacked: its relay key copied to another process."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from controller import box_relay
from controller.box_relay import refresh
from controller.relay.link_admit import LinkPeer, still_admitted
from tests.controller.harness import run, running_controller


def _key_of(context: object, name: str) -> str:
    row = context.store.query_one("SELECT key_sha256 FROM relays WHERE name = ?", (name,))  # type: ignore[attr-defined]
    assert row is not None
    return str(row["key_sha256"])


def test_a_copied_box_relay_key_is_shut_out_by_replacing_the_key_file(tmp_path: Path) -> None:
    """The store cannot tell a process holding a copy of tls/relay.key from the box: the row names a key,
    not a process, and the box cannot be revoked. Removing the key file is the way out: at its next
    heartbeat the box makes a new key, issues itself a certificate for it and writes it in its row, and
    every link admitted with the old key (the copy's) no longer is."""
    async def scenario() -> None:
        async with running_controller(tmp_path / "c") as running:
            context = running.context
            box = box_relay.box_relay(context)
            copied = LinkPeer(box.name, "-", _key_of(context, box.name), time.time() + 3600)  # what a link of the copy was admitted as
            assert still_admitted(context, copied) is None  # indistinguishable from the box itself

            box.key_path.unlink()
            refresh(context, box, True)  # what the box's heartbeat does (run_box_relay)
            assert _key_of(context, box.name) != copied.key_sha256
            assert still_admitted(context, copied) == f"relay {box.name} was enrolled again with another key"
            assert stat.S_IMODE(box.key_path.stat().st_mode) == 0o600
            ours = LinkPeer(box.name, "-", _key_of(context, box.name), time.time() + 3600)
            assert still_admitted(context, ours) is None

    run(scenario())
