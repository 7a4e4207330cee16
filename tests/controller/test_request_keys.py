"""Request keys: typed ``web.RequestKey`` where aiohttp has it (a ``str`` key warns there), a ``str`` on aiohttp 3.8."""

from __future__ import annotations

import warnings

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from controller.actor import ACTOR_KEY
from controller.request_keys import request_key
from controller.signin.api import PERSON_KEY, SCOPE_KEY

KEYS = (ACTOR_KEY, PERSON_KEY, SCOPE_KEY)


@pytest.mark.skipif(not hasattr(web, "RequestKey"), reason="this aiohttp has no web.RequestKey (Debian's 3.8)")
def test_every_key_of_the_door_is_a_request_key_and_storing_under_it_does_not_warn() -> None:
    assert all(isinstance(key, web.RequestKey) for key in KEYS), KEYS
    request = make_mocked_request("GET", "/api/v1/status")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in KEYS:
            request[key] = None
    assert [request.get(key, "unset") for key in KEYS] == [None, None, None]


def test_without_request_key_the_name_itself_is_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web, "RequestKey", raising=False)
    key = request_key("outpost.example")
    assert isinstance(key, str) and key == "outpost.example"


def test_the_keys_are_distinct() -> None:
    assert len({str(key) for key in KEYS}) == len(KEYS)
