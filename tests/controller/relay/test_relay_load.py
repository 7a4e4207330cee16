"""One peer cannot stall or exhaust the controller: bounded BINDs, one transaction per frame,
blocking work off the event loop, and audit budgets per identity.

A real controller (TLS, relay mounted) runs in-process on 127.0.0.1; agents
connect with the agent's own tunnel client. Where a test needs a frame our
agent would never send (a BIND past the limit), it queues the raw frame on
the agent's protocol core.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import TunnelRefused
from agent.tunnel.client import AgentSession, TunnelCredentials
from controller.audit import IDENTITY_REFUSALS_PER_MINUTE, AnonymousBudget
from shared.protocol import MAX_BIND_SERVICES, MAX_CONTROL_PAYLOAD, MAX_SERVICE_NAME_CHARS, ErrorCode
from shared.protocol.frames import FrameType, encode_json
from shared.protocol.handshake import SHORT_REFUSAL
from shared.tunnel.session import ChannelReset
from tests.controller.harness import Running, make_csr, make_key, run, running_controller
from tests.controller.relay.relay_harness import (
    SCENARIO_TIMEOUT,
    KeyOf,
    connect,
    csr_for,
    enrolled,
    foreign_certificate,
)

#: A relay's answer to one frame comes back within this on a loaded machine.
ANSWER_TIMEOUT = 15.0


def audit_rows(ctl: Running, event: str) -> list[dict]:
    """Every recorded ``event``'s fields, oldest first."""
    return [e["fields"] for e in ctl.context.audit.recent(1000) if e["event"] == event]


async def bind_answer(session: AgentSession, services: list[str]) -> None:
    """Send one BIND and wait for its BIND_RESULT (on_bind_completed sets ``authenticated``)."""
    session.authenticated.clear()
    session.conn.send_bind(services)
    await session.flush()
    await asyncio.wait_for(session.authenticated.wait(), ANSWER_TIMEOUT)


async def raw_bind(session: AgentSession, services: list[str]) -> None:
    """Queue a BIND our agent would refuse to send, and send it."""
    session.conn._endpoint.queue_frame(FrameType.BIND, 0, 0, encode_json({"services": services}))
    await session.flush()


def test_a_bind_past_the_limit_closes_the_tunnel_with_the_reason_and_decides_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-flood")
            async with connect(ctl, credentials) as (session, _):
                commits = ctl.context.store.commits
                await raw_bind(session, [f"s{i}" for i in range(6000)])
                await asyncio.wait_for(session.closed.wait(), ANSWER_TIMEOUT)
                code, reason, remote = session.close_reason
                assert (code, remote) == (ErrorCode.PROTOCOL_ERROR, True)
                assert f"BIND names 6000 services; one BIND may name at most {MAX_BIND_SERVICES}" in reason
            # Not one decision was made or audited; the tunnel's close is the only row.
            assert audit_rows(ctl, "bind_denied") == [] and audit_rows(ctl, "bind_allowed") == []
            await asyncio.sleep(0.2)
            assert ctl.context.store.commits - commits <= 1

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_service_name_longer_than_any_service_is_refused_in_the_core(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            async with connect(ctl, await enrolled(ctl, "gw-long")) as (session, _):
                await raw_bind(session, ["x" * (MAX_SERVICE_NAME_CHARS + 1)])
                await asyncio.wait_for(session.closed.wait(), ANSWER_TIMEOUT)
                assert f"a service name has at most {MAX_SERVICE_NAME_CHARS}" in session.close_reason[1]

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_the_agent_core_will_not_send_a_bind_past_the_limit() -> None:
    from shared.protocol import Connection, LocalProtocolError, Role
    from shared.protocol.state import Handshake

    conn = Connection(Role.AGENT, 0.0)
    conn._auth.state = Handshake.DONE
    conn._endpoint.authenticated = True
    with pytest.raises(LocalProtocolError, match=f"at most {MAX_BIND_SERVICES}"):
        conn.send_bind([f"s{i}" for i in range(MAX_BIND_SERVICES + 1)])
    assert conn.data_to_send() == b""


def test_the_answer_to_a_maximal_bind_fits_in_one_control_frame(tmp_path: Path) -> None:
    # The worst names for size: the longest allowed, of characters JSON escapes to six bytes.
    names = [f"{i:03d}" + "\x01" * (MAX_SERVICE_NAME_CHARS - 3) for i in range(MAX_BIND_SERVICES)]
    assert len(encode_json({"services": names})) <= MAX_CONTROL_PAYLOAD

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            async with connect(ctl, await enrolled(ctl, "gw-max")) as (session, _):
                await bind_answer(session, names)
                assert session.bound == ()
                assert sorted(session.refused) == sorted(names)
                # The full reasons (each naming the service again) did not fit: the short form went out.
                assert set(session.refused.values()) == {SHORT_REFUSAL}
                assert not session.conn.closed
            # The audit log keeps the full reasons (within the identity's budget).
            denied = audit_rows(ctl, "bind_denied")
            assert len(denied) == IDENTITY_REFUSALS_PER_MINUTE
            assert all(row["reason"].startswith("no service named default/") for row in denied)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_one_bind_frame_is_one_store_transaction(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            for name in ("plc", "hmi"):
                status, body = await ctl.call("POST", "/api/v1/services", {"name": name, "roles": ["ot"]})
                assert status == 201, body
            status, body = await ctl.call("POST", "/api/v1/policies",
                                          {"kind": "bind", "identities": ["gw-one"], "services": ["plc", "hmi"]})
            assert status == 201, body
            async with connect(ctl, await enrolled(ctl, "gw-one")) as (session, _):
                requested = ["plc", "hmi"] + [f"missing-{i}" for i in range(10)]
                commits = ctl.context.store.commits
                await bind_answer(session, requested)
                assert ctl.context.store.commits - commits == 1
                assert sorted(session.bound) == ["hmi", "plc"] and len(session.refused) == 10
                # The same BIND again: the binds it holds are not recorded twice, the refusals are (budgeted).
                commits = ctl.context.store.commits
                await bind_answer(session, requested)
                assert ctl.context.store.commits - commits == 1
                await bind_answer(session, ["plc", "hmi"])
                assert ctl.context.store.commits - commits == 1  # nothing new to record: no transaction
            assert len(audit_rows(ctl, "bind_allowed")) == 2
            assert len(audit_rows(ctl, "bind_denied")) == 20

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


@contextlib.contextmanager
def blocking_work_threads(ctl: Running) -> Iterator[list[tuple[str, bool]]]:
    """(what, ran on the event loop's thread?) for every store transaction and CA signature in the block."""
    seen: list[tuple[str, bool]] = []
    loop_thread = threading.current_thread()
    store, ca = ctl.context.store, ctl.context.ca
    transaction, issue = store.transaction, ca.issue

    def watched_transaction() -> Any:
        seen.append(("transaction", threading.current_thread() is loop_thread))
        return transaction()

    def watched_issue(*args: Any, **kwargs: Any) -> Any:
        seen.append(("signature", threading.current_thread() is loop_thread))
        return issue(*args, **kwargs)

    store.transaction, ca.issue = watched_transaction, watched_issue  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del store.transaction, ca.issue


def test_no_store_write_or_signature_runs_on_the_event_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-t", ["ot"])  # "operator" exists from the start
            with blocking_work_threads(ctl) as seen:
                key = make_key()
                status, body = await ctl.call("POST", "/v1/enroll", {"token": created["token"], "csr": make_csr(key, "gw-t")},
                                              admin=False)
                assert status == 200, body
                status, body = await ctl.call("POST", "/v1/renew", {"csr": make_csr(key, "gw-t")}, admin=False)
                assert status == 200, body
                status, body = await ctl.call("POST", "/v1/renew", {"csr": make_csr(make_key(), "nobody")}, admin=False)
                assert status == 403, body
                operator_key = KeyOf(ec.generate_private_key(ec.SECP256R1()))
                status, body = await ctl.call("POST", "/api/v1/identities/operator/session",
                                              {"csr": csr_for(operator_key, "operator")})
                assert status == 201, body
                credentials = await enrolled(ctl, "gw-u")
                async with connect(ctl, credentials) as (session, _):
                    await bind_answer(session, ["plc", "hmi"])
                    channel = session.open_stream("plc")
                    with pytest.raises(ChannelReset):
                        await asyncio.wait_for(channel.wait_accepted(), ANSWER_TIMEOUT)
                foreign_key = ec.generate_private_key(ec.SECP256R1())
                forged = TunnelCredentials(uri=credentials.uri, chain_pem=[foreign_certificate(credentials.uri, foreign_key)],
                                           ca_pem=credentials.ca_pem, keystore=KeyOf(foreign_key))
                with pytest.raises(TunnelRefused):
                    async with connect(ctl, forged):
                        pass
                await asyncio.sleep(0.2)  # the closed tunnel's row
                for path, body in (("/api/v1/services", {"name": "plc"}),
                                   ("/api/v1/policies", {"kind": "dial", "identities": ["gw-u"], "services": ["plc"]}),
                                   ("/api/v1/identities/gw-u/token", {}), ("/api/v1/identities/gw-u/disable", None),
                                   ("/api/v1/identities/gw-u/enable", None), ("/api/v1/identities/gw-u/revoke", None)):
                    status, answer = await ctl.call("POST", path, body)
                    assert status in (200, 201), (path, answer)
            kinds = {what for what, _ in seen}
            assert kinds == {"transaction", "signature"}, seen
            assert [what for what, loop in seen if loop] == [], seen

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_denied_binds_and_dials_of_one_identity_are_recorded_within_its_budget(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-noisy")
            async with connect(ctl, credentials) as (session, _):
                await bind_answer(session, [f"nope-{i}" for i in range(MAX_BIND_SERVICES)])
                refusals = []
                for _ in range(3):
                    channels = [session.open_stream("nope") for _ in range(50)]
                    for channel in channels:
                        with pytest.raises(ChannelReset) as refused:
                            await asyncio.wait_for(channel.wait_accepted(), ANSWER_TIMEOUT)
                        refusals.append(refused.value.code)
                assert set(refusals) == {ErrorCode.SERVICE_UNKNOWN} and len(refusals) == 150
                # The tunnel still works: a refusal costs the flooder, not the tunnel.
                assert not session.conn.closed
            assert len(audit_rows(ctl, "bind_denied")) == IDENTITY_REFUSALS_PER_MINUTE
            dials = audit_rows(ctl, "dial_denied")
            assert len(dials) == IDENTITY_REFUSALS_PER_MINUTE
            assert {row["identity"] for row in dials} == {"default/gw-noisy"}
            # A request is recorded only with its decision: the flood leaves no requests without one.
            assert len(audit_rows(ctl, "dial_requested")) == IDENTITY_REFUSALS_PER_MINUTE

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_tunnel_refusals_of_unauthenticated_peers_go_through_the_anonymous_budget(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            ctl.context.audit.anonymous_budget = AnonymousBudget(per_minute=3)
            genuine = await enrolled(ctl, "gw-real")
            for _ in range(8):
                key = ec.generate_private_key(ec.SECP256R1())
                junk = TunnelCredentials(uri=genuine.uri, chain_pem=[foreign_certificate(genuine.uri, key)],
                                         ca_pem=genuine.ca_pem, keystore=KeyOf(key))
                with pytest.raises(TunnelRefused, match="not issued by this controller's CA"):
                    async with connect(ctl, junk):
                        pass
            rows = audit_rows(ctl, "tunnel_refused")
            assert len(rows) == 3, rows
            # Nobody proved to be anybody: the rows name no identity.
            assert all("identity" not in row for row in rows)

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_a_refused_tunnel_of_a_verified_certificate_names_the_identity_in_a_field(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-gone")
            status, body = await ctl.call("POST", "/api/v1/identities/gw-gone/revoke")
            assert status == 200, body
            for _ in range(IDENTITY_REFUSALS_PER_MINUTE + 5):
                with pytest.raises(TunnelRefused, match="revoked"):
                    async with connect(ctl, credentials):
                        pass
            rows = audit_rows(ctl, "tunnel_refused")
            assert len(rows) == IDENTITY_REFUSALS_PER_MINUTE
            assert {row["identity"] for row in rows} == {"default/gw-gone"}

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT * 2))


def test_a_revocation_announced_from_a_worker_thread_closes_the_tunnel(tmp_path: Path) -> None:
    """Enrollment and renewal now run in worker threads; a listener they call must still reach the event loop."""

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            credentials = await enrolled(ctl, "gw-threaded")
            async with connect(ctl, credentials) as (session, _):
                registry = ctl.context.registry
                identity = registry.get_identity("default", "gw-threaded")
                blocked = type(identity)(**{**identity.__dict__, "status": "revoked"})
                # Announced from a thread, as a listener called inside a worker's transaction would be.
                await asyncio.to_thread(registry.announce_blocked, blocked)
                await asyncio.wait_for(session.closed.wait(), 2.0)
                assert session.close_reason[0] == ErrorCode.REVOKED

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))


def test_past_the_api_queue_bound_a_renewal_is_told_to_retry_and_nothing_changes(tmp_path: Path) -> None:
    from controller.blocking import API_POOL
    from tests.controller.harness import store_snapshot

    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl") as ctl:
            created = await ctl.create_identity("gw-busy")
            key = make_key()
            status, body = await ctl.enroll(created["token"], key, "gw-busy")
            assert status == 200, body
            before = store_snapshot(ctl.context.settings.store_path)
            bound = API_POOL.max_pending
            API_POOL.max_pending = 0
            try:
                status, body = await ctl.call("POST", "/v1/renew", {"csr": make_csr(key, "gw-busy")}, admin=False)
            finally:
                API_POOL.max_pending = bound
            assert (status, body["error"]) == (503, "controller_busy"), body
            assert body["message"] == "The controller is busy with other requests; retry in a few seconds."
            assert store_snapshot(ctl.context.settings.store_path) == before
            status, body = await ctl.call("POST", "/v1/renew", {"csr": make_csr(key, "gw-busy")}, admin=False)
            assert status == 200, body

    run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
