"""Authentication: CHALLENGE, AUTH, AUTH_OK (docs/protocol.md, "Authentication")."""

from __future__ import annotations

import base64
import json

import pytest
from protocol_pairs import (
    CHAIN,
    NONCE,
    RELAY_CERT_SHA256,
    RELAY_INFO,
    SIGNATURE,
    make_pair,
    raw_frame,
    read_frames,
    snapshot,
)

from shared.protocol import (
    INITIAL_WINDOW,
    PROTOCOL_VERSION,
    Authenticated,
    AuthReceived,
    ChallengeReceived,
    Connection,
    ConnectionTerminated,
    ErrorCode,
    Handshake,
    LocalProtocolError,
    ProtocolLimits,
    RemoteProtocolError,
    Role,
    auth_message,
)
from shared.protocol.frames import FrameType
from shared.protocol.handshake import TRANSITIONS as HANDSHAKE_TRANSITIONS
from shared.protocol.handshake import HandshakeInput


def test_auth_message_binds_the_nonce_to_the_relay_certificate() -> None:
    assert auth_message(NONCE, RELAY_CERT_SHA256) == b"outpost-tunnel-auth-v1\0" + NONCE + RELAY_CERT_SHA256


def test_full_handshake_between_relay_and_agent() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(NONCE)
    _, agent_events = pair.pump()
    assert agent_events == [ChallengeReceived(PROTOCOL_VERSION, NONCE)]

    pair.agent.send_auth(CHAIN, SIGNATURE, extra={"keepalive": 25.0})
    relay_events, _ = pair.pump()
    assert relay_events == [
        AuthReceived(tuple(CHAIN), SIGNATURE, {"version": PROTOCOL_VERSION, "window": INITIAL_WINDOW, "keepalive": 25.0})
    ]
    assert not pair.relay.authenticated, "the relay decides after verifying, not on receipt"

    pair.relay.accept_auth(dict(RELAY_INFO))
    assert pair.relay.authenticated
    _, agent_events = pair.pump()
    assert agent_events == [Authenticated({**RELAY_INFO, "window": INITIAL_WINDOW})]
    assert pair.agent.authenticated
    assert pair.agent.peer_info == {**RELAY_INFO, "window": INITIAL_WINDOW}
    assert pair.relay.peer_info["keepalive"] == 25.0
    assert pair.relay.handshake is pair.agent.handshake is Handshake.DONE


def test_auth_payload_carries_version_chain_base64_signature_and_window() -> None:
    pair = make_pair(authenticate=False, agent_limits=ProtocolLimits(initial_window=1 << 20))
    pair.relay.send_challenge(NONCE)
    pair.pump()
    pair.agent.send_auth(CHAIN, SIGNATURE, extra={"agent": "1.0"})
    [(frame_type, _, stream_id, payload)] = read_frames(pair.agent.data_to_send())
    assert (frame_type, stream_id) == (FrameType.AUTH, 0)
    assert json.loads(payload) == {
        "version": 1, "chain": CHAIN, "signature": base64.b64encode(SIGNATURE).decode(), "window": 1 << 20,
        "agent": "1.0",
    }


def test_each_side_learns_the_window_the_other_advertised() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=100_000),
                     agent_limits=ProtocolLimits(initial_window=300_000))
    stream_id = pair.agent.open_stream("svc")
    assert pair.agent.send_window(stream_id) == 100_000
    pair.pump()
    assert pair.relay.send_window(stream_id) == 300_000


def test_challenge_carries_version_and_nonce() -> None:
    relay = Connection(Role.RELAY, 0.0)
    relay.send_challenge(NONCE)
    assert read_frames(relay.data_to_send()) == [(FrameType.CHALLENGE, 0, 0, bytes([1]) + NONCE)]


def test_agent_reports_a_foreign_version_and_lets_the_caller_refuse() -> None:
    agent = Connection(Role.AGENT, 0.0)
    events = agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([2]) + b"future"), 0.0)
    assert events == [ChallengeReceived(2, b"future")]
    agent.close(ErrorCode.UNSUPPORTED_VERSION, "agent speaks version 1")
    assert read_frames(agent.data_to_send())[-1][0] == FrameType.GOAWAY


def test_relay_refuses_auth_of_another_version() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(NONCE)
    pair.pump()
    body = {"version": 2, "chain": CHAIN, "signature": base64.b64encode(SIGNATURE).decode()}
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(raw_frame(FrameType.AUTH, 0, json.dumps(body).encode()), 0.0)
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert pair.relay.closed


def test_relay_refusal_reaches_the_agent_as_termination() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(NONCE)
    pair.pump()
    pair.agent.send_auth(CHAIN, SIGNATURE)
    pair.pump()
    pair.relay.close(ErrorCode.AUTH_FAILED, "identity gw-1 is revoked")
    _, agent_events = pair.pump()
    assert agent_events == [ConnectionTerminated(ErrorCode.AUTH_FAILED, "identity gw-1 is revoked", remote=True)]
    assert pair.agent.closed and not pair.agent.authenticated
    assert pair.agent.get_timer() is None


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[1, 2]",
    json.dumps({"version": 1, "chain": [], "signature": "AA=="}).encode(),
    json.dumps({"version": 1, "chain": "pem", "signature": "AA=="}).encode(),
    json.dumps({"version": 1, "chain": [1], "signature": "AA=="}).encode(),
    json.dumps({"version": 1, "chain": CHAIN, "signature": "not base64!"}).encode(),
    json.dumps({"version": 1, "chain": CHAIN}).encode(),
    json.dumps({"version": "1", "chain": CHAIN, "signature": "AA=="}).encode(),
    json.dumps({"version": 1, "chain": CHAIN, "signature": "AA==", "window": 0}).encode(),
    json.dumps({"version": 1, "chain": CHAIN, "signature": "AA==", "window": True}).encode(),
    json.dumps({"version": 1, "chain": CHAIN, "signature": "AA==", "window": 2**31}).encode(),
    b"[" * 50_000 + b"]" * 10_000,
    b"\xff\xfe\x00garbage",
], ids=["not-json", "not-object", "empty-chain", "chain-not-list", "chain-not-strings", "bad-base64",
        "no-signature", "version-string", "window-zero", "window-bool", "window-too-big", "deep-nesting", "bad-utf8"])
def test_malformed_auth_is_a_connection_error(payload: bytes) -> None:
    relay = Connection(Role.RELAY, 0.0)
    relay.send_challenge(NONCE)
    relay.data_to_send()
    with pytest.raises(RemoteProtocolError) as caught:
        relay.receive_data(raw_frame(FrameType.AUTH, 0, payload), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    assert relay.closed and not relay.authenticated
    [(frame_type, _, _, goaway)] = read_frames(relay.data_to_send())
    assert frame_type == FrameType.GOAWAY and goaway[:4] == b"\0\0\0\1"


@pytest.mark.parametrize("frame_type", [FrameType.OPEN, FrameType.DATA, FrameType.PING, FrameType.BIND,
                                        FrameType.WINDOW, FrameType.RESET, FrameType.ACCEPT])
def test_frames_before_authentication_are_refused(frame_type: FrameType) -> None:
    relay = Connection(Role.RELAY, 0.0)
    relay.send_challenge(NONCE)
    stream_id = 1 if frame_type in (FrameType.OPEN, FrameType.DATA, FrameType.WINDOW, FrameType.RESET,
                                    FrameType.ACCEPT) else 0
    payload = {FrameType.OPEN: b'{"service":"x"}', FrameType.PING: bytes(8), FrameType.BIND: b'{"services":[]}',
               FrameType.WINDOW: b"\0\0\0\1", FrameType.RESET: b"\0\0\0\0"}.get(frame_type, b"")
    with pytest.raises(RemoteProtocolError) as caught:
        relay.receive_data(raw_frame(frame_type, stream_id, payload), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    assert "before authentication" in str(caught.value)
    assert relay.closed


def test_frames_between_auth_and_auth_ok_are_refused_on_the_relay() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(NONCE)
    pair.pump()
    pair.agent.send_auth(CHAIN, SIGNATURE)
    pair.pump()
    with pytest.raises(RemoteProtocolError):
        pair.relay.receive_data(raw_frame(FrameType.BIND, 0, b'{"services":["a"]}'), 0.0)


@pytest.mark.parametrize("role,frame_type,payload", [
    (Role.RELAY, FrameType.CHALLENGE, bytes([1]) + NONCE),
    (Role.RELAY, FrameType.AUTH_OK, b"{}"),
    (Role.AGENT, FrameType.AUTH, b"{}"),
    (Role.AGENT, FrameType.AUTH_OK, b"{}"),
], ids=["challenge-to-relay", "auth-ok-to-relay", "auth-to-agent", "auth-ok-before-auth"])
def test_handshake_frames_in_the_wrong_direction_or_order_are_refused(role, frame_type, payload) -> None:
    conn = Connection(role, 0.0)
    if role is Role.RELAY:
        conn.send_challenge(NONCE)
    with pytest.raises(RemoteProtocolError) as caught:
        conn.receive_data(raw_frame(frame_type, 0, payload), 0.0)
    assert "unexpected" in str(caught.value)


def test_a_second_challenge_is_refused() -> None:
    agent = Connection(Role.AGENT, 0.0)
    frame = raw_frame(FrameType.CHALLENGE, 0, bytes([1]) + NONCE)
    agent.receive_data(frame, 0.0)
    with pytest.raises(RemoteProtocolError):
        agent.receive_data(frame, 0.0)


def test_a_challenge_with_a_short_nonce_is_refused() -> None:
    agent = Connection(Role.AGENT, 0.0)
    with pytest.raises(RemoteProtocolError) as caught:
        agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([1]) + NONCE[:16]), 0.0)
    assert caught.value.code is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("misuse", [
    lambda r, a: a.send_challenge(NONCE),
    lambda r, a: r.send_challenge(NONCE[:31]),
    lambda r, a: a.send_auth(CHAIN, SIGNATURE),
    lambda r, a: r.send_auth(CHAIN, SIGNATURE),
    lambda r, a: r.accept_auth({}),
    lambda r, a: a.accept_auth({}),
    lambda r, a: a.send_bind(["svc"]),
    lambda r, a: r.send_bind_result([], {}),
    lambda r, a: a.open_stream("svc"),
    lambda r, a: r.open_stream("svc"),
    lambda r, a: a.ping(0.0),
], ids=["agent-challenges", "short-nonce", "auth-without-challenge", "relay-sends-auth", "accept-without-auth",
        "agent-accepts-auth", "bind-before-auth", "bind-result-before-auth", "agent-opens-before-auth",
        "relay-opens-before-auth", "ping-before-auth"])
def test_handshake_misuse_raises_and_changes_nothing(misuse) -> None:
    relay, agent = Connection(Role.RELAY, 0.0), Connection(Role.AGENT, 0.0)
    before = snapshot(relay), snapshot(agent)
    with pytest.raises(LocalProtocolError):
        misuse(relay, agent)
    assert (snapshot(relay), snapshot(agent)) == before


def test_send_auth_refuses_extra_fields_that_would_override_the_protocols() -> None:
    agent = Connection(Role.AGENT, 0.0)
    agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([1]) + NONCE), 0.0)
    before = snapshot(agent)
    with pytest.raises(LocalProtocolError, match="window"):
        agent.send_auth(CHAIN, SIGNATURE, extra={"window": 1})
    assert snapshot(agent) == before


def test_oversized_auth_is_refused_locally_before_it_is_queued() -> None:
    agent = Connection(Role.AGENT, 0.0)
    agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([1]) + NONCE), 0.0)
    before = snapshot(agent)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        agent.send_auth(["x" * 70_000], SIGNATURE)
    assert snapshot(agent) == before
    agent.send_auth(CHAIN, SIGNATURE)
    assert agent.handshake is Handshake.AUTH_EXCHANGED


# -- the handshake's transition table -----------------------------------------------------------

RECEIVED_FRAMES = {
    HandshakeInput.RECV_CHALLENGE: (FrameType.CHALLENGE, bytes([PROTOCOL_VERSION]) + NONCE),
    HandshakeInput.RECV_AUTH: (FrameType.AUTH, json.dumps({
        "version": PROTOCOL_VERSION, "chain": CHAIN, "signature": base64.b64encode(SIGNATURE).decode()}).encode()),
    HandshakeInput.RECV_AUTH_OK: (FrameType.AUTH_OK, json.dumps(RELAY_INFO).encode()),
    HandshakeInput.RECV_BIND: (FrameType.BIND, b'{"services": ["svc"]}'),
    HandshakeInput.RECV_BIND_RESULT: (FrameType.BIND_RESULT, b'{"bound": ["svc"], "refused": {}}'),
}


def _end_at(role: Role, state: Handshake) -> Connection:
    """The ``role`` end of a fresh pair, its handshake walked as far as ``state``."""
    pair = make_pair(authenticate=False)
    steps = [lambda: pair.relay.send_challenge(NONCE), lambda: pair.agent.send_auth(CHAIN, SIGNATURE),
             lambda: pair.relay.accept_auth(dict(RELAY_INFO))]
    conn = pair.relay if role is Role.RELAY else pair.agent
    for step in steps:
        if conn.handshake is state:
            break
        step()
        pair.pump()
    if state is Handshake.DONE and role is Role.AGENT:
        conn.send_bind(["svc"])  # so that a BIND_RESULT is answered, not merely out of order
    assert conn.handshake is state
    return conn


ILLEGAL_RECEIVED = [(role, state, event) for role in Role for state in Handshake
                    for event in RECEIVED_FRAMES if (state, event) not in HANDSHAKE_TRANSITIONS[role]]
LEGAL_RECEIVED = [(role, state, event, new) for role in Role
                  for (state, event), new in HANDSHAKE_TRANSITIONS[role].items() if event.received]


@pytest.mark.parametrize("role,state,event", ILLEGAL_RECEIVED,
                         ids=[f"{r.name}-{s.name}-{e.frame}" for r, s, e in ILLEGAL_RECEIVED])
def test_every_handshake_frame_the_table_does_not_list_ends_the_tunnel_with_protocol_error(role, state, event) -> None:
    conn = _end_at(role, state)
    frame_type, payload = RECEIVED_FRAMES[event]
    with pytest.raises(RemoteProtocolError) as caught:
        conn.receive_data(raw_frame(frame_type, 0, payload), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    assert conn.closed and conn.handshake is state
    [(goaway, _, _, _)] = read_frames(conn.data_to_send())[-1:]
    assert goaway == FrameType.GOAWAY


@pytest.mark.parametrize("role,state,event,new", LEGAL_RECEIVED,
                         ids=[f"{r.name}-{s.name}-{e.frame}" for r, s, e, _ in LEGAL_RECEIVED])
def test_every_received_handshake_row_of_the_table_happens(role, state, event, new) -> None:
    conn = _end_at(role, state)
    frame_type, payload = RECEIVED_FRAMES[event]
    assert conn.receive_data(raw_frame(frame_type, 0, payload), 0.0)
    assert conn.handshake is new and not conn.closed


def test_the_handshake_takes_its_transitions_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the relay's (START, SEND_CHALLENGE) row the table forbids challenging, and nothing is queued.
    monkeypatch.delitem(HANDSHAKE_TRANSITIONS[Role.RELAY], (Handshake.START, HandshakeInput.SEND_CHALLENGE))
    relay = Connection(Role.RELAY, 0.0)
    with pytest.raises(LocalProtocolError, match="cannot send CHALLENGE on the relay's handshake: it is start"):
        relay.send_challenge(NONCE)
    assert relay.data_to_send() == b"" and relay.handshake is Handshake.START
    # Without the agent's (START, RECV_CHALLENGE) row a CHALLENGE is the peer's violation.
    monkeypatch.delitem(HANDSHAKE_TRANSITIONS[Role.AGENT], (Handshake.START, HandshakeInput.RECV_CHALLENGE))
    agent = Connection(Role.AGENT, 0.0)
    with pytest.raises(RemoteProtocolError, match="unexpected CHALLENGE"):
        agent.receive_data(raw_frame(FrameType.CHALLENGE, 0, bytes([PROTOCOL_VERSION]) + NONCE), 0.0)
