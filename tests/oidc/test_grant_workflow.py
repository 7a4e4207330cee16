"""Just-in-time grants with the real identity provider: oscar asks, april approves, the dial lives until the grant ends.

Two people sign in through the device flow; the requester cannot approve
their own grant; the approved grant is an expiring policy whose live dial,
through a real tunnel, is closed at expiry; the whole story shares one
correlation id in the audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path

from agent.tunnel.client import TunnelOptions
from outpostctl.cli import build_parser
from outpostctl.client import ManagementClient
from outpostctl.config import load_config
from outpostctl.errors import OutpostError
from shared.protocol import ErrorCode
from tests.controller.harness import Running, run, running_controller, store_snapshot
from tests.controller.relay.relay_harness import connect, credentials_from, csr_for, enrolled, new_keystore
from tests.controller.relay.test_relay_decisions import DIAL_ANSWER_TIMEOUT, Echo
from tests.oidc.harness import IdP
from tests.oidc.signin_harness import call, device_sign_in, signin_settings
from tests.oidc.test_ctl_login import person_config

#: The grant's lifetime here: long enough to sign a session certificate and dial under load, short for a test.
GRANT_FOR = "6s"
#: What the issue promises: the connections a grant allowed are closed within this of its end.
CLOSE_DEADLINE = 2.0


def audit_of(running: Running, correlation: str) -> list[tuple[str, dict]]:
    rows = store_snapshot(running.context.settings.store_path)["audit"]
    return [(r[2], json.loads(r[3])) for r in rows if json.loads(r[3]).get("correlation") == correlation]


def test_a_grant_from_request_to_expiry_with_its_live_connection_closed(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as ctl, Echo() as echo:
            admin = ctl.admin_token
            for path, body in (("/api/v1/services", {"name": "modbus"}),
                               ("/api/v1/policies", {"kind": "bind", "identities": ["gw-1"], "services": ["modbus"]})):
                status, answer = await call(ctl, "POST", path, body, bearer=admin)
                assert status == 201, answer
            gateway = await enrolled(ctl, "gw-1")
            oscar = (await device_sign_in(ctl, idp, "oscar"))["session"]
            april = (await device_sign_in(ctl, idp, "april"))["session"]
            # Nothing lets oscar in yet; he asks.
            status, grant = await call(ctl, "POST", "/api/v1/grants",
                                       {"service": "modbus@gw-1", "for": GRANT_FOR, "reason": "PLC firmware"},
                                       bearer=oscar)
            assert status == 201 and grant["status"] == "pending", grant
            gid, correlation = grant["id"], grant["correlation"]
            # He cannot approve it himself: one sentence, nothing changed, one row.
            before = store_snapshot(ctl.context.settings.store_path)
            status, refused = await call(ctl, "POST", f"/api/v1/grants/{gid}/approve", bearer=oscar)
            assert status == 403, refused
            after = store_snapshot(ctl.context.settings.store_path)
            assert after["grants"] == before["grants"] and after["policies"] == before["policies"]
            assert [r[2] for r in after["audit"][len(before["audit"]):]] == ["management_refused"]
            # An approver who asks cannot answer her own grant either: the sentence says so, under its correlation.
            alice = (await device_sign_in(ctl, idp, "alice"))["session"]
            status, own = await call(ctl, "POST", "/api/v1/grants",
                                     {"service": "modbus", "for": "1h", "reason": "audit walk"}, bearer=alice)
            assert status == 201, own
            before = store_snapshot(ctl.context.settings.store_path)
            status, refused = await call(ctl, "POST", f"/api/v1/grants/{own['id']}/approve", bearer=alice)
            assert (status, refused["error"]) == (403, "own_grant"), refused
            assert refused["message"] == f"You requested grant {own['id']}; another approver must approve it."
            after = store_snapshot(ctl.context.settings.store_path)
            assert after["grants"] == before["grants"] and after["policies"] == before["policies"]
            assert [e for e, _ in audit_of(ctl, own["correlation"])] == ["grant_requested", "grant_refused"]
            # An approver who did not ask: april sees both and approves oscar's.
            status, listed = await call(ctl, "GET", "/api/v1/grants", bearer=april)
            assert [(g["id"], g["status"]) for g in listed["grants"]] == [(gid, "pending"), (own["id"], "pending")]
            status, mine = await call(ctl, "GET", "/api/v1/grants", bearer=oscar)
            assert [g["id"] for g in mine["grants"]] == [gid]  # a requester sees his own only
            status, approved = await call(ctl, "POST", f"/api/v1/grants/{gid}/approve", bearer=april)
            assert status == 200 and approved["status"] == "approved", approved
            assert approved["decided_by"] == "default/april"
            status, again = await call(ctl, "POST", f"/api/v1/grants/{gid}/deny", bearer=april)
            assert (status, again["error"]) == (409, "grant_decided")
            status, policies = await call(ctl, "GET", "/api/v1/policies", bearer=admin)
            policy = next(p for p in policies["policies"] if p["id"] == approved["policy"])
            assert policy["identities"] == ["oscar"] and policy["services"] == ["modbus@gw-1"]
            # oscar's session certificate, as outpostctl connect gets it, and a live dial through a real tunnel.
            keystore = new_keystore()
            status, issued = await call(ctl, "POST", "/api/v1/identities/oscar/session",
                                        {"csr": csr_for(keystore, "oscar")}, bearer=oscar)
            assert status == 201, issued
            binds = TunnelOptions(binds={"modbus": ("127.0.0.1", echo.port)})
            async with connect(ctl, gateway, binds) as _, connect(ctl, credentials_from(issued, keystore)) as (
                    dialer, _):
                channel = dialer.open_stream("modbus@gw-1")
                await asyncio.wait_for(channel.wait_accepted(), DIAL_ANSWER_TIMEOUT)
                await channel.write(b"read coils")
                assert await asyncio.wait_for(channel.read(), DIAL_ANSWER_TIMEOUT) == b"read coils"
                await asyncio.wait_for(channel.wait_reset(), policy["expires_at"] - time.time() + CLOSE_DEADLINE)
                assert time.time() < policy["expires_at"] + CLOSE_DEADLINE
                assert channel.error is not None and channel.error.code == ErrorCode.POLICY_DENIED
                assert channel.error.reason.startswith(f"policy {policy['id']} expired at ")
            for _ in range(100):  # the expiry's row is written by a worker job; bounded wait
                events = [event for event, _ in audit_of(ctl, correlation)]
                if "policy_expired" in events:
                    break
                await asyncio.sleep(0.05)
            assert events == ["grant_requested", "policy_created", "grant_approved", "grant_refused", "grant_used",
                              "policy_expired"], events

    run(scenario())


def test_the_grant_commands_as_people_run_them(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as ctl:
            status, _ = await call(ctl, "POST", "/api/v1/services", {"name": "historian"}, bearer=ctl.admin_token)
            assert status == 201
            config = load_config(person_config(tmp_path, ctl.api_url, ctl.context.settings.ca_cert_path))
            people = {name: (await device_sign_in(ctl, idp, name))["session"] for name in ("oscar", "april")}

            async def as_person(name: str, *argv: str) -> str:
                args = build_parser().parse_args(list(argv))
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    code = await asyncio.to_thread(args.handler, args,
                                                   ManagementClient(replace(config, token=people[name])))
                assert code == 0
                return out.getvalue()

            said = await as_person("oscar", "grant", "request", "historian", "--for", "1h", "--reason", "trend check")
            assert said.startswith("requested grant 1 for historian (1h); an approver answers it with "
                                   "outpostctl grant approve 1 before ")
            try:
                await as_person("oscar", "grant", "approve", "1")
                raise AssertionError("the requester's approval was accepted")
            except OutpostError as refused:
                assert "Approving a grant needs the approver role" in str(refused)
            table = await as_person("april", "grant", "list")
            assert table.splitlines()[1].split()[:4] == ["1", "pending", "default/oscar", "default/historian"]
            said = await as_person("april", "grant", "approve", "1")
            assert said.startswith("approved grant 1: default/oscar may dial default/historian for 3600s (policy ")

    run(scenario())
