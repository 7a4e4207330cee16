"""People's sign-in keeps its state the same way on both store engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.audit import AuditLog
from controller.registry import Registry
from controller.settings import DEFAULT_TRUST_DOMAIN
from controller.signin.config import parse_config
from controller.signin.errors import SigninRefused
from controller.signin.people import People
from controller.signin.service import SigninService
from controller.store import Store
from tests.controller.harness import TEST_CHAIN_KEY


def service_on(store: Store) -> SigninService:
    audit = AuditLog(store, chain_key=TEST_CHAIN_KEY)
    return SigninService(parse_config({}, Path(".")), store, Registry(store, audit, DEFAULT_TRUST_DOMAIN), audit)


def test_a_nonce_made_by_one_process_is_good_in_another_sharing_the_store(
    store: Store, store_location: str | Path
) -> None:
    other = Store(store_location)
    try:
        nonce = service_on(store).new_nonce()["nonce"]
        assert service_on(other).check_nonce(nonce)
    finally:
        other.close()


def test_an_id_token_is_accepted_once(store: Store) -> None:
    audit = AuditLog(store, chain_key=TEST_CHAIN_KEY)
    people = People(store, Registry(store, audit, DEFAULT_TRUST_DOMAIN), audit)
    far = 4_000_000_000.0
    with store.transaction() as db:
        people.remember_once(db, "id_token", "token-a", far, "id_token_replayed", "already used")
    with pytest.raises(SigninRefused, match="already used"), store.transaction() as db:
        people.remember_once(db, "id_token", "token-a", far, "id_token_replayed", "already used")
    with store.transaction() as db:
        people.remember_once(db, "id_token", "token-b", far, "id_token_replayed", "already used")
