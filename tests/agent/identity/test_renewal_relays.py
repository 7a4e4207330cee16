"""A renewal keeps the controller's relay list for the next start, and writes it only when it changed."""

from __future__ import annotations

from pathlib import Path

from agent.identity.keeper import CertificateKeeper
from agent.identity.select import open_keystore
from tests.agent.identity.test_renewal_keeper import SOFTWARE, enrolled_gateway
from tests.controller.harness import run, running_controller


def test_a_renewal_writes_the_relay_list_only_when_the_controller_sent_another(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, list[str] | None, list[str]]:
        async with running_controller(tmp_path / "c") as running:
            state = await enrolled_gateway(running, tmp_path, "gw-relays")
            keystore = open_keystore(state.path, SOFTWARE)
            await CertificateKeeper(state, keystore).renew_now()
            # The same list as enrollment's: nothing written (the state may be an SD card).
            unchanged_written = (state.path / "relays.json").exists()
            # A list kept from an older answer: the renewal's newer one replaces it.
            state.save_relays(["wss://relay-gone.example.net/v1/tunnel"])
            await CertificateKeeper(state, keystore).renew_now()
            return unchanged_written, state.load_relays(), state.load().relays

    unchanged_written, kept, enrolled = run(scenario())
    assert not unchanged_written
    assert kept == enrolled and kept != ["wss://relay-gone.example.net/v1/tunnel"]
