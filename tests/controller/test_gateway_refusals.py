"""Every refused enrollment or renewal leaves one audit row (reason, peer address) and changes nothing else.

Refusals of peers nobody authenticated share one budget per process,
whether the refusal came before the body was read (413, not JSON), on its
content (a bad token, a bad CSR, a key nobody enrolled), or at either
endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controller.api import MAX_REQUEST_BODY
from controller.audit import AnonymousBudget
from controller.ca import public_key_sha256
from tests.controller.harness import (
    Running,
    audit_events_added,
    make_csr,
    make_key,
    run,
    running_controller,
    store_snapshot,
)

ENDPOINTS = {"/v1/enroll": "enrollment_refused", "/v1/renew": "renewal_refused"}


async def chunked_too_large() -> Any:
    # No Content-Length: only the read limit can stop it.
    for _ in range(MAX_REQUEST_BODY // 8192 + 2):
        yield b"x" * 8192


#: case -> (send the request to path; its status, error code)
Send = Callable[[Running, str], Awaitable[tuple[int, str]]]


async def declared_too_large(running: Running, path: str) -> tuple[int, str]:
    status_line = await running.post_declaring(path, MAX_REQUEST_BODY * 16, b'{"csr": "')
    return int(status_line.split()[1]), "body_too_large"


async def posted(running: Running, path: str, data: Any) -> tuple[int, str]:
    status, body = await running.post_bytes(path, data)
    return status, body["error"]


UNREAD_REFUSALS: dict[str, tuple[Send, int, str]] = {
    "declared_too_large": (declared_too_large, 413, "body_too_large"),
    "chunked_too_large": (lambda running, path: posted(running, path, chunked_too_large()), 413, "body_too_large"),
    "not_json": (lambda running, path: posted(running, path, b'{"token": '), 400, "invalid_json"),
    "not_an_object": (lambda running, path: posted(running, path, b'["csr"]'), 400, "invalid_json"),
    "empty": (lambda running, path: posted(running, path, b""), 400, "invalid_json"),
}


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@pytest.mark.parametrize("case", sorted(UNREAD_REFUSALS))
def test_a_request_refused_before_its_content_is_read_is_audited_once_with_reason_and_peer(
    data_dir: Path, case: str, path: str
) -> None:
    send, status, code = UNREAD_REFUSALS[case]

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            await running.create_identity("gw")
            before = store_snapshot(running.context.settings.store_path)
            assert await send(running, path) == (status, code)
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [(ENDPOINTS[path], {"reason": code, "remote": "127.0.0.1"})]

    run(scenario())


@pytest.mark.parametrize("path, code", [("/v1/enroll", "token_malformed"), ("/v1/renew", "csr_invalid")])
def test_a_request_missing_its_fields_is_audited_once_with_reason_and_peer(data_dir: Path, path: str, code: str) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call("POST", path, {}, admin=False)
            assert (status, body["error"]) == (400, code)
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [(ENDPOINTS[path], {"reason": code, "remote": "127.0.0.1"})]

    run(scenario())


def test_a_renewal_by_a_key_nobody_enrolled_is_audited_with_the_keys_hash_and_never_the_csr(data_dir: Path) -> None:
    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            created = await running.create_identity("gw")
            assert (await running.enroll(created["token"], make_key()))[0] == 200
            stranger = make_key()
            csr = make_csr(stranger)
            before = store_snapshot(running.context.settings.store_path)
            status, body = await running.call("POST", "/v1/renew", {"csr": csr}, admin=False)
            assert (status, body["error"]) == (403, "renewal_unknown_key")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [("renewal_refused", {
                "reason": "renewal_unknown_key",
                "remote": "127.0.0.1",
                "key_sha256": public_key_sha256(stranger.public_key()),
            })]
            pem_body = "".join(csr.strip().splitlines()[1:-1])
            assert pem_body[:40] not in json.dumps(added)

    run(scenario())


def test_refusals_at_both_endpoints_share_one_budget_and_the_next_row_counts_the_skipped(data_dir: Path) -> None:
    now = [1000.0]

    async def scenario() -> None:
        async with running_controller(data_dir) as running:
            running.context.audit.anonymous_budget = AnonymousBudget(per_minute=3, clock=lambda: now[0])
            before = store_snapshot(running.context.settings.store_path)
            assert await posted(running, "/v1/enroll", b"not json") == (400, "invalid_json")
            assert await posted(running, "/v1/renew", b"not json") == (400, "invalid_json")
            for _ in range(3):
                status, body = await running.call("POST", "/v1/renew", {"csr": make_csr(make_key())}, admin=False)
                assert (status, body["error"]) == (403, "renewal_unknown_key")
            assert await declared_too_large(running, "/v1/enroll") == (413, "body_too_large")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert [(event, fields["reason"]) for event, fields in added] == [
                ("enrollment_refused", "invalid_json"),
                ("renewal_refused", "invalid_json"),
                ("renewal_refused", "renewal_unknown_key"),
            ]
            assert not any("suppressed" in fields for _, fields in added)
            now[0] += 20.0  # a third of a minute: one more row may be written
            before = store_snapshot(running.context.settings.store_path)
            assert await posted(running, "/v1/enroll", b"[]") == (400, "invalid_json")
            assert await posted(running, "/v1/enroll", b"[]") == (400, "invalid_json")
            added = audit_events_added(before, store_snapshot(running.context.settings.store_path))
            assert added == [("enrollment_refused", {"reason": "invalid_json", "remote": "127.0.0.1", "suppressed": 3})]

    run(scenario())
