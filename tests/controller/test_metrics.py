"""``/metrics``: its own listener and credential, Prometheus names, bounded labels, scraped with the real parser."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.tunnel.client import TunnelOptions
from controller.metrics import reason_code
from controller.metrics_server import METRICS_TOKEN_FILE
from tests.controller.harness import Running, run, running_controller
from tests.controller.relay.relay_harness import SCENARIO_TIMEOUT, connect, enrolled


async def scrape(ctl: Running, token: str | None) -> tuple[int, str]:
    port = ctl.server.metrics_port
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with ctl.session.get(f"https://127.0.0.1:{port}/metrics", headers=headers) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_a_scrape_without_the_metrics_credential_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", metrics_listen_host="127.0.0.1", metrics_listen_port=0) as ctl:
            token_file = tmp_path / "ctl" / METRICS_TOKEN_FILE
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            for token in (None, ctl.admin_token, "x" * 43, token_file.read_text().strip() + "x"):
                status, body = await scrape(ctl, token)
                assert status == 401 and "outpost_" not in body and "metrics credential" in body
            # The management API is not served on the metrics listener, nor /metrics on the others.
            port = ctl.server.metrics_port
            async with ctl.session.get(f"https://127.0.0.1:{port}/api/v1/identities", headers=ctl.admin) as r:
                assert r.status == 404
            status, _ = await ctl.call("GET", "/metrics")
            assert status == 404

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_metrics_say_what_the_fleet_does_with_bounded_labels(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", metrics_listen_host="127.0.0.1", metrics_listen_port=0) as ctl:
            token = (tmp_path / "ctl" / METRICS_TOKEN_FILE).read_text().strip()
            creds = await enrolled(ctl, "gw-metrics")
            await ctl.call("POST", "/api/v1/services", {"name": "unpermitted"})
            async with connect(ctl, creds, TunnelOptions(binds={"unpermitted": ("127.0.0.1", 9)})) as (session, _):
                assert session.refused  # no policy allows the bind
                status, text = await scrape(ctl, token)
                assert status == 200
                found = samples(text)
                assert found[("outpost_identities", (("presence", "online"), ("tenant", "default")))] == 1
                assert found[("outpost_identities", (("presence", "never"), ("tenant", "default")))] >= 1
                assert found[("outpost_tunnels", (("tenant", "default"),))] == 1
                assert found[("outpost_tunnel_bytes_total", (("direction", "in"),))] > 0
                assert found[("outpost_enrollments_total", (("reason", "none"), ("result", "ok")))] == 1
                assert found[("outpost_binds_total", (("reason", "no_policy"), ("result", "denied")))] == 1
                assert found[("outpost_certificates_expiring", (("within", "7d"),))] == 1
                assert ("outpost_unauthenticated_connections", (("listener", "listener"),)) in found
                assert found[("outpost_event_loop_lag_seconds", ())] >= 0
                assert ("outpost_store_write_seconds_count", ()) in found
                # Never an identity (or any unbounded name) as a label value.
                for (_name, labels) in found:
                    assert all("gw-metrics" not in value and "spiffe" not in value for _, value in labels)
            await ctl.call("POST", "/api/v1/identities/gw-metrics/revoke")
            status, text = await scrape(ctl, token)
            assert samples(text)[("outpost_revocations_total", ())] == 1

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_the_metrics_credential_survives_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", metrics_listen_host="127.0.0.1", metrics_listen_port=0):
            first = (tmp_path / "ctl" / METRICS_TOKEN_FILE).read_text()
        async with running_controller(tmp_path / "ctl", metrics_listen_host="127.0.0.1", metrics_listen_port=0) as ctl:
            assert (tmp_path / "ctl" / METRICS_TOKEN_FILE).read_text() == first
            status, _ = await scrape(ctl, first.strip())
            assert status == 200

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_no_metrics_listener_unless_asked(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            assert ctl.server.metrics_port is None and not (tmp_path / "ctl" / METRICS_TOKEN_FILE).exists()

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_reasons_are_a_short_fixed_list() -> None:
    assert reason_code("no policy allows identity default/gw to dial service default/x", "denied") == "no_policy"
    assert reason_code("token_expired", "refused") == "token_expired"
    assert reason_code("Something Nobody Foresaw about gw-7", "denied") == "other"
    assert reason_code(None, "refused") == "other" and reason_code("whatever", "allowed") == "none"



