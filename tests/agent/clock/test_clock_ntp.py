"""NTP through ntplib against a real UDP responder on 127.0.0.1 serving a chosen offset."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.clock.ntp import query_server, query_servers
from agent.clock.settings import NTP_PORT, split_server
from tests.agent.clock.ntp_responder import NtpResponder, silent_port

YEAR = 365 * 86400
#: Loopback answers in well under a millisecond here, but the responder is a thread of this process:
#: under emulation on a busy machine each side waits its turn for the interpreter, tens of ms or more.
#: The offsets served are 12.5 s and more, far outside this.
LOOPBACK_ERROR = 0.5


@pytest.mark.parametrize("offset", [0.0, 12.5, -YEAR, YEAR])
def test_the_offset_is_what_the_server_serves(offset: float) -> None:
    with NtpResponder(offset=offset) as server:
        sample = query_server(server.address, timeout=2.0)
    assert sample is not None and sample.source == "ntp" and sample.origin == server.address
    assert sample.offset == pytest.approx(offset, abs=LOOPBACK_ERROR)
    assert 0 <= sample.delay < LOOPBACK_ERROR
    assert abs(sample.local_time - time.time()) < 5


@pytest.mark.parametrize("misbehaviour", [{"stratum": 0}, {"stratum": 16}, {"leap": 3}, {"foreign_origin": True}])
def test_an_unsynchronised_or_foreign_answer_is_ignored(misbehaviour: dict) -> None:
    with NtpResponder(offset=3600, **misbehaviour) as server:
        assert query_server(server.address, timeout=1.0) is None
        assert server.requests == 1


def test_a_silent_server_costs_one_timeout_and_gives_nothing() -> None:
    started = time.monotonic()
    assert query_server(silent_port(), timeout=0.3) is None
    assert time.monotonic() - started < 1.0


def test_all_servers_are_asked_at_once_and_the_shortest_round_trip_wins() -> None:
    with NtpResponder(offset=42.0) as good, NtpResponder(silent=True) as blocked:
        started = time.monotonic()
        sample = asyncio.run(query_servers([blocked.address, good.address, silent_port()], timeout=0.5))
        elapsed = time.monotonic() - started
    assert sample is not None and sample.origin == good.address
    assert sample.offset == pytest.approx(42.0, abs=LOOPBACK_ERROR)
    assert blocked.requests == 1
    assert elapsed < 1.5, "the queries run in parallel, bounded by one timeout"


def test_no_servers_or_no_answers_mean_no_sample() -> None:
    assert asyncio.run(query_servers([], timeout=0.5)) is None
    assert asyncio.run(query_servers([silent_port()], timeout=0.2)) is None


@pytest.mark.parametrize("spec, expected", [
    ("pool.ntp.org", ("pool.ntp.org", NTP_PORT)),
    ("127.0.0.1:1123", ("127.0.0.1", 1123)),
    ("[::1]:1123", ("::1", 1123)),
    ("[::1]", ("::1", NTP_PORT)),
    ("2001:db8::1", ("2001:db8::1", NTP_PORT)),
])
def test_server_names_take_an_optional_port(spec: str, expected: tuple[str, int]) -> None:
    assert split_server(spec) == expected


@pytest.mark.parametrize("spec", ["", "a b", "host:0", "host:70000", "host:", "[::1", "[::1]x", ":123"])
def test_malformed_server_names_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        split_server(spec)
