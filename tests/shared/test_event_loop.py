"""The one event loop of a process: the named loop runs, and a missing uvloop is one sentence naming the setting."""

from __future__ import annotations

import pytest

from shared import event_loop
from shared.errors import OutpostError


async def loop_name() -> str:
    return event_loop.running_loop_name()


def test_asyncio_forces_the_standard_loop() -> None:
    assert event_loop.run(loop_name(), "asyncio") == "asyncio"


def test_auto_runs_uvloop_where_it_is_installed() -> None:
    expected = "asyncio" if event_loop.uvloop_module() is None else "uvloop"
    assert event_loop.run(loop_name(), "auto").split()[0] == expected


def test_a_missing_uvloop_asked_for_by_name_says_which_setting_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "uvloop_module", lambda: None)
    main = loop_name()
    with pytest.raises(OutpostError) as missing:
        event_loop.run(main, "uvloop", setting='event_loop = "{}" in the agent config')
    assert str(missing.value) == (
        'event_loop = "uvloop" in the agent config: uvloop is not installed; install python3-uvloop '
        '(or the uvloop extra) or use event_loop = "asyncio" in the agent config.')
    assert main.cr_frame is None  # closed, never left un-awaited
    with pytest.raises(OutpostError, match=r"^--event-loop uvloop: .* or use --event-loop asyncio\.$"):
        event_loop.run(loop_name(), "uvloop")
