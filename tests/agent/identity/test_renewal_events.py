"""A renewed or recovered certificate is logged with the journal fields an operator searches by.

The enrolled, connected and disconnected events are read from a real journal
in tests/packaging/test_boot_watchdog.py; a renewal is due only hours after
enrollment, so here the records are caught as the logging module hands them on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.identity.keeper import CertificateKeeper
from agent.identity.recovery import recover_at_start
from agent.identity.select import open_keystore
from tests.agent.identity.test_renewal_keeper import SOFTWARE, age_certificate, enrolled_gateway
from tests.controller.harness import run, running_controller


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [(r.getMessage().split(";")[0], r.OUTPOST_EVENT, r.OUTPOST_IDENTITY)
            for r in caplog.records if hasattr(r, "OUTPOST_EVENT")]


def test_a_renewal_and_a_recovery_are_renewed_events_naming_the_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.identity")

    async def scenario() -> str:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path, "gw-events")
            keystore = open_keystore(state.path, SOFTWARE)
            await CertificateKeeper(state, keystore).renew_now()
            age_certificate(running, state, days=1)
            assert await recover_at_start(state, keystore)
            return state.load().uri

    uri = run(scenario())
    assert events(caplog) == [("certificate renewed", "renewed", uri), ("certificate recovered", "renewed", uri)]
