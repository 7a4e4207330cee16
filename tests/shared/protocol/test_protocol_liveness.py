"""Timers: auth deadline, keepalive PING, dead peer, idle peer (docs/protocol.md, "Liveness")."""

from __future__ import annotations

import random

import pytest
from protocol_pairs import CHAIN, NONCE, SIGNATURE, make_pair, raw_frame, read_frames

from shared.protocol import (
    AUTH_DEADLINE,
    Connection,
    ConnectionTerminated,
    ErrorCode,
    InvalidLimits,
    Liveness,
    PongReceived,
    ProtocolLimits,
    Role,
)
from shared.protocol.endpoint import Endpoint
from shared.protocol.frames import FrameType, decode_code_reason
from shared.protocol.liveness import Keepalive

KEEPALIVE = 25.0
PING_TIMEOUT = 10.0
START = 1000.0


def _ping_payload(data: bytes) -> bytes:
    [(frame_type, _, _, payload)] = read_frames(data)
    assert frame_type == FrameType.PING
    return payload


def _agent(now: float = START) -> Connection:
    pair = make_pair(now, agent_liveness=Liveness(KEEPALIVE, PING_TIMEOUT))
    return pair.agent


def test_a_quiet_tunnel_sends_a_keepalive_ping_when_due() -> None:
    agent = _agent()
    assert agent.get_timer() == START + KEEPALIVE
    assert agent.handle_timer(START + KEEPALIVE - 0.1) == []
    assert agent.data_to_send() == b""
    assert agent.handle_timer(START + KEEPALIVE) == []
    assert len(_ping_payload(agent.data_to_send())) == 8
    assert agent.get_timer() == START + KEEPALIVE + PING_TIMEOUT


def test_pong_measures_the_round_trip_and_reschedules_the_next_ping() -> None:
    agent = _agent()
    agent.handle_timer(START + KEEPALIVE)
    payload = _ping_payload(agent.data_to_send())
    events = agent.receive_data(raw_frame(FrameType.PONG, 0, payload), START + KEEPALIVE + 0.6)
    assert events == [PongReceived(pytest.approx(0.6))]
    assert agent.last_rtt == pytest.approx(0.6)
    assert agent.get_timer() == pytest.approx(START + KEEPALIVE + 0.6 + KEEPALIVE)


def test_each_ping_carries_a_new_payload() -> None:
    agent = _agent()
    payloads = []
    now = START
    for _ in range(3):
        now += KEEPALIVE
        agent.handle_timer(now)
        payloads.append(_ping_payload(agent.data_to_send()))
        agent.receive_data(raw_frame(FrameType.PONG, 0, payloads[-1]), now)
    assert len(set(payloads)) == 3


def test_a_busy_tunnel_sends_no_pings() -> None:
    agent = _agent()
    now = START
    for _ in range(10):
        now += KEEPALIVE / 2
        agent.receive_data(raw_frame(FrameType.PING, 0, bytes(8)), now)  # any frame is life
        assert agent.handle_timer(now) == []
    assert all(f[0] == FrameType.PONG for f in read_frames(agent.data_to_send()))


def test_the_tunnel_is_dead_when_nothing_arrives_within_the_ping_timeout() -> None:
    agent = _agent()
    agent.handle_timer(START + KEEPALIVE)
    agent.data_to_send()
    assert agent.handle_timer(START + KEEPALIVE + PING_TIMEOUT - 0.01) == []
    [event] = agent.handle_timer(START + KEEPALIVE + PING_TIMEOUT)
    assert event == ConnectionTerminated(ErrorCode.TIMEOUT, event.reason, remote=False)
    assert "PING" in event.reason
    assert agent.closed and agent.get_timer() is None
    [(frame_type, _, _, payload)] = read_frames(agent.data_to_send())
    assert frame_type == FrameType.GOAWAY and decode_code_reason(payload)[0] is ErrorCode.TIMEOUT
    assert agent.handle_timer(START + 1000) == []


def test_a_two_second_stall_shorter_than_the_ping_timeout_keeps_the_tunnel() -> None:
    agent = _agent()
    ping_at = START + KEEPALIVE
    agent.handle_timer(ping_at)
    payload = _ping_payload(agent.data_to_send())
    assert agent.handle_timer(ping_at + 1.0) == []
    assert agent.receive_data(raw_frame(FrameType.PONG, 0, payload), ping_at + 2.0) == [PongReceived(2.0)]
    assert agent.handle_timer(ping_at + PING_TIMEOUT + 1) == []
    assert not agent.closed


def test_anything_received_after_the_ping_counts_as_life() -> None:
    agent = _agent()
    ping_at = START + KEEPALIVE
    agent.handle_timer(ping_at)
    agent.data_to_send()
    agent.receive_data(raw_frame(FrameType.PING, 0, bytes(8)), ping_at + 8.0)
    assert agent.handle_timer(ping_at + PING_TIMEOUT + 1) == []
    assert agent.get_timer() == ping_at + 8.0 + PING_TIMEOUT
    [event] = agent.handle_timer(ping_at + 8.0 + PING_TIMEOUT)
    assert event.code is ErrorCode.TIMEOUT


def test_a_manual_ping_while_one_is_in_flight_sends_nothing_more() -> None:
    agent = _agent()
    agent.ping(START + 1)
    assert len(read_frames(agent.data_to_send())) == 1
    agent.ping(START + 2)
    assert agent.data_to_send() == b""


def test_the_relay_never_pings_but_drops_an_idle_tunnel() -> None:
    pair = make_pair(START, relay_liveness=Liveness(keepalive_interval=None, idle_timeout=600.0))
    relay = pair.relay
    assert relay.get_timer() == START + 600.0
    assert relay.handle_timer(START + 599.0) == [] and relay.data_to_send() == b""
    relay.receive_data(raw_frame(FrameType.PING, 0, bytes(8)), START + 300.0)
    assert relay.get_timer() == START + 900.0
    [event] = relay.handle_timer(START + 900.0)
    assert event.code is ErrorCode.TIMEOUT and not event.remote and relay.closed


def test_a_relay_without_valid_auth_drops_the_connection_at_the_deadline() -> None:
    relay = Connection(Role.RELAY, START, liveness=Liveness(keepalive_interval=None))
    relay.send_challenge(NONCE)
    relay.data_to_send()
    assert relay.get_timer() == START + AUTH_DEADLINE
    assert relay.handle_timer(START + AUTH_DEADLINE - 0.1) == []
    [event] = relay.handle_timer(START + AUTH_DEADLINE)
    assert event == ConnectionTerminated(ErrorCode.TIMEOUT, f"no valid AUTH within {AUTH_DEADLINE:g} s", False)
    assert read_frames(relay.data_to_send())[0][0] == FrameType.GOAWAY


def test_an_agent_without_auth_ok_gives_up_at_the_deadline() -> None:
    agent = Connection(Role.AGENT, START, limits=ProtocolLimits(auth_deadline=5.0))
    agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([1]) + NONCE), START + 1)
    agent.send_auth(CHAIN, SIGNATURE)
    assert agent.get_timer() == START + 5.0, "no keepalive before authentication"
    [event] = agent.handle_timer(START + 5.0)
    assert event.code is ErrorCode.TIMEOUT and "AUTH_OK" in event.reason


def test_authentication_stops_the_auth_deadline() -> None:
    pair = make_pair(START, relay_liveness=Liveness(keepalive_interval=None))
    assert pair.relay.get_timer() is None
    assert pair.relay.handle_timer(START + AUTH_DEADLINE * 10) == []
    assert not pair.relay.closed


def test_bad_liveness_and_limit_settings_are_refused_with_a_clear_error() -> None:
    with pytest.raises(InvalidLimits, match="keepalive"):
        Liveness(keepalive_interval=0)
    with pytest.raises(InvalidLimits, match="window"):
        ProtocolLimits(initial_window=0)


def _deadline_by_definition(keepalive: Keepalive) -> float | None:
    """The next deadline as the four named deadlines define it: the earliest that is set."""
    auth = keepalive.auth_deadline if not keepalive._endpoint.authenticated else None
    found = [d for d in (auth, keepalive.ping_due(), keepalive.dead_at(), keepalive.idle_at()) if d is not None]
    return min(found) if found else None


def test_next_deadline_is_the_earliest_named_deadline_in_every_state() -> None:
    """The folded-in ``next_deadline`` agrees with its definition for every combination of states."""
    rng = random.Random(14)
    checked = 0
    for _ in range(3000):
        settings = Liveness(keepalive_interval=rng.choice([None, 0.5, 5.0, 30.0]),
                            ping_timeout=rng.choice([0.25, 5.0, 60.0]),
                            idle_timeout=rng.choice([None, 1.0, 45.0, 600.0]))
        endpoint = Endpoint(rng.choice([Role.AGENT, Role.RELAY]), ProtocolLimits())
        keepalive = Keepalive(endpoint, settings, now=rng.uniform(0, 100))
        endpoint.authenticated = rng.random() < 0.7
        keepalive.last_received = rng.uniform(0, 200)
        if rng.random() < 0.5:
            keepalive.ping_sent_at = keepalive.last_received + rng.uniform(-50, 50)
        assert keepalive.next_deadline() == _deadline_by_definition(keepalive)
        checked += 1
    assert checked == 3000
