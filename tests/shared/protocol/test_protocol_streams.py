"""Stream states: every transition in the table, illegal inputs, ids, limits, forgetting."""

from __future__ import annotations

import pytest
from protocol_pairs import Pair, make_pair, raw_frame, read_frames, snapshot

from shared.protocol import (
    DataReceived,
    ErrorCode,
    LocalProtocolError,
    ProtocolLimits,
    RemoteProtocolError,
    StreamAccepted,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
)
from shared.protocol.frames import FLAG_FIN, FrameType, decode_code_reason
from shared.protocol.limits import RESET_MEMORY
from shared.protocol.streams import TRANSITIONS, UNACCEPTED, StreamInput

S, I = StreamState, StreamInput  # noqa: E741  (the table's two axes, as short as in docs/protocol.md)
SMALL_WINDOW = 1024


def _stream_in(pair: Pair, state: StreamState, *, peer_opened: bool) -> int:
    """A stream at the agent in ``state``, opened by the agent or by the relay, accepted or not as the state says."""
    if peer_opened:
        stream_id = pair.relay.open_stream("svc")
    else:
        stream_id = pair.agent.open_stream("svc")
    pair.pump()
    accepted = {twin: live for live, twin in UNACCEPTED.items()}
    wire = accepted.get(state, state)
    if wire is state:  # an accepted state: the end that did not open accepts first
        (pair.agent if peer_opened else pair.relay).accept_stream(stream_id)
        pair.pump()
    if wire is S.HALF_CLOSED_LOCAL:
        pair.agent.end_stream(stream_id)
        pair.pump()
    elif wire is S.HALF_CLOSED_REMOTE:
        pair.relay.end_stream(stream_id)
        pair.pump()
    assert pair.agent.stream_state(stream_id) is state
    return stream_id


def _apply(pair: Pair, stream_id: int, stream_input: StreamInput) -> list:
    """Feed ``stream_input`` to the agent's side of the stream; returns the agent's events."""
    agent = pair.agent
    if stream_input is I.SEND_ACCEPT:
        agent.accept_stream(stream_id)
    elif stream_input is I.SEND_DATA:
        agent.send_data(stream_id, b"x")
    elif stream_input is I.SEND_FIN:
        agent.end_stream(stream_id)
    elif stream_input is I.SEND_RESET:
        agent.reset_stream(stream_id, ErrorCode.CANCEL)
    elif stream_input is I.SEND_WINDOW:
        agent.receive_data(raw_frame(FrameType.DATA, stream_id, bytes(SMALL_WINDOW)), 0.0)
        agent.acknowledge_received(stream_id, SMALL_WINDOW)
        assert read_frames(agent.data_to_send()) == [(FrameType.WINDOW, 0, stream_id, SMALL_WINDOW.to_bytes(4, "big"))]
        return []
    elif stream_input is I.RECV_ACCEPT:
        return agent.receive_data(raw_frame(FrameType.ACCEPT, stream_id), 0.0)
    elif stream_input is I.RECV_DATA:
        return agent.receive_data(raw_frame(FrameType.DATA, stream_id, b"x"), 0.0)
    elif stream_input is I.RECV_FIN:
        return agent.receive_data(raw_frame(FrameType.DATA, stream_id, flags=FLAG_FIN), 0.0)
    elif stream_input is I.RECV_RESET:
        return agent.receive_data(raw_frame(FrameType.RESET, stream_id, b"\0\0\0\7"), 0.0)
    elif stream_input is I.RECV_WINDOW:
        return agent.receive_data(raw_frame(FrameType.WINDOW, stream_id, b"\0\0\0\1"), 0.0)
    else:
        raise AssertionError(stream_input)
    return []


LIVE_TRANSITIONS = sorted(
    ((state, stream_input, new) for (state, stream_input), new in TRANSITIONS.items() if state is not S.IDLE),
    key=lambda t: (t[0].value, t[1].value),
)


@pytest.mark.parametrize("state,stream_input,expected", LIVE_TRANSITIONS,
                         ids=[f"{s.name}-{i.name}" for s, i, _ in LIVE_TRANSITIONS])
def test_every_transition_in_the_table_happens(state, stream_input, expected) -> None:
    limits = ProtocolLimits(initial_window=SMALL_WINDOW)
    pair = make_pair(agent_limits=limits)
    stream_id = _stream_in(pair, state, peer_opened=stream_input is I.SEND_ACCEPT)
    _apply(pair, stream_id, stream_input)
    assert pair.agent.stream_state(stream_id) is expected
    assert (stream_id in pair.agent.open_stream_ids) is (expected is not S.CLOSED)
    assert not pair.agent.closed


def test_idle_streams_open_by_sending_or_receiving_open(pair: Pair) -> None:
    sent = pair.agent.open_stream("svc")
    assert pair.agent.stream_state(sent) is TRANSITIONS[(S.IDLE, I.SEND_OPEN)] is S.OPEN_UNACCEPTED
    received = pair.relay.open_stream("svc")
    pair.pump()
    assert pair.agent.stream_state(received) is TRANSITIONS[(S.IDLE, I.RECV_OPEN)] is S.OPEN_UNACCEPTED


def test_no_transition_leaves_the_closed_state() -> None:
    assert not [key for key in TRANSITIONS if key[0] is S.CLOSED]


@pytest.mark.parametrize("state,stream_input", [
    (S.HALF_CLOSED_LOCAL, I.SEND_DATA),
    (S.HALF_CLOSED_LOCAL, I.SEND_FIN),
])
def test_illegal_local_inputs_raise_and_change_nothing(state, stream_input) -> None:
    assert (state, stream_input) not in TRANSITIONS
    pair = make_pair()
    stream_id = _stream_in(pair, state, peer_opened=False)
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError) as caught:
        _apply(pair, stream_id, stream_input)
    assert caught.value.code is ErrorCode.STREAM_CLOSED
    assert snapshot(pair.agent) == before


@pytest.mark.parametrize("stream_input", [I.RECV_DATA, I.RECV_FIN])
def test_data_after_the_peer_ended_resets_only_that_stream(stream_input) -> None:
    assert (S.HALF_CLOSED_REMOTE, stream_input) not in TRANSITIONS
    pair = make_pair()
    other = pair.agent.open_stream("other")
    stream_id = _stream_in(pair, S.HALF_CLOSED_REMOTE, peer_opened=False)
    events = _apply(pair, stream_id, stream_input)
    reason = f"unexpected DATA on stream {stream_id}: it is half-closed (remote)"
    assert events == [StreamReset(stream_id, ErrorCode.STREAM_CLOSED, reason, False)]
    [(frame_type, _, reset_id, payload)] = read_frames(pair.agent.data_to_send())
    assert (frame_type, reset_id, decode_code_reason(payload)[0]) == (FrameType.RESET, stream_id,
                                                                      ErrorCode.STREAM_CLOSED)
    assert not pair.agent.closed and pair.agent.open_stream_ids == {other}


def test_accept_is_only_for_the_end_that_did_not_open(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError, match="opened by this end"):
        pair.agent.accept_stream(stream_id)
    assert snapshot(pair.agent) == before


def test_accepting_twice_is_misuse(pair: Pair) -> None:
    stream_id = pair.relay.open_stream("svc")
    pair.pump()
    pair.agent.accept_stream(stream_id)
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError, match="cannot send ACCEPT on stream 2: it is open$"):
        pair.agent.accept_stream(stream_id)
    assert snapshot(pair.agent) == before


@pytest.mark.parametrize("peer_opened", [True, False], ids=["own-stream", "twice"])
def test_a_wrong_accept_from_the_peer_resets_the_stream(peer_opened: bool) -> None:
    pair = make_pair()
    stream_id = _stream_in(pair, S.OPEN_UNACCEPTED, peer_opened=peer_opened)
    if not peer_opened:
        assert _apply(pair, stream_id, I.RECV_ACCEPT) == [StreamAccepted(stream_id)]
        assert pair.agent.stream_state(stream_id) is S.OPEN
    [event] = _apply(pair, stream_id, I.RECV_ACCEPT)
    assert isinstance(event, StreamReset) and event.code is ErrorCode.PROTOCOL_ERROR and not event.remote
    assert not pair.agent.closed


def test_data_flows_before_accept(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"early")
    relay_events, _ = pair.pump()
    assert relay_events == [StreamOpened(stream_id, "svc", None), DataReceived(stream_id, b"early")]


def test_local_ids_are_odd_for_the_agent_and_even_for_the_relay_and_increase(pair: Pair) -> None:
    assert [pair.agent.open_stream("s") for _ in range(3)] == [1, 3, 5]
    assert [pair.relay.open_stream("s") for _ in range(3)] == [2, 4, 6]


def test_only_the_relay_may_name_a_peer(pair: Pair) -> None:
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError):
        pair.agent.open_stream("svc", peer="spiffe://x/y/z")
    assert snapshot(pair.agent) == before


@pytest.mark.parametrize("stream_id", [2, 4], ids=["even-from-agent", "relay-parity"])
def test_a_peer_opening_a_stream_of_the_wrong_parity_is_a_connection_error(pair: Pair, stream_id: int) -> None:
    with pytest.raises(RemoteProtocolError, match="parity") as caught:
        pair.relay.receive_data(raw_frame(FrameType.OPEN, stream_id, b'{"service":"s"}'), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR and pair.relay.closed


def test_a_peer_reusing_or_lowering_an_id_is_a_connection_error(pair: Pair) -> None:
    pair.relay.receive_data(raw_frame(FrameType.OPEN, 5, b'{"service":"s"}'), 0.0)
    with pytest.raises(RemoteProtocolError, match="increase"):
        pair.relay.receive_data(raw_frame(FrameType.OPEN, 3, b'{"service":"s"}'), 0.0)


@pytest.mark.parametrize("frame_type,payload", [
    (FrameType.DATA, b"x"), (FrameType.WINDOW, b"\0\0\0\1"), (FrameType.RESET, b"\0\0\0\0"), (FrameType.ACCEPT, b""),
])
def test_frames_on_a_stream_never_opened_are_a_connection_error(pair: Pair, frame_type, payload) -> None:
    with pytest.raises(RemoteProtocolError, match="never opened"):
        pair.agent.receive_data(raw_frame(frame_type, 7, payload), 0.0)


def test_a_stream_flood_beyond_max_streams_is_refused_per_stream() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(max_streams=4))
    ids = [pair.agent.open_stream(f"svc{i}") for i in range(6)]
    relay_events, _ = pair.pump()
    assert [e.stream_id for e in relay_events if isinstance(e, StreamOpened)] == ids[:4]
    refused = [e for e in pair.agent_events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.code, e.remote) for e in refused] == [(i, ErrorCode.REFUSED_STREAM, True) for i in ids[4:]]
    assert pair.relay.open_stream_ids == set(ids[:4]) and not pair.relay.closed
    # Data the agent sent on a refused stream before it learnt is dropped quietly.
    assert pair.relay.receive_data(raw_frame(FrameType.DATA, ids[5], b"late"), 0.0) == []
    # A closed stream frees its place.
    pair.agent.reset_stream(ids[0], ErrorCode.CANCEL)
    later = pair.agent.open_stream("again")
    relay_events, _ = pair.pump()
    assert relay_events == [StreamReset(ids[0], ErrorCode.CANCEL, "", True), StreamOpened(later, "again", None)]


def test_streams_closed_both_ways_are_forgotten() -> None:
    pair = make_pair()
    for _ in range(50):
        stream_id = pair.agent.open_stream("svc")
        pair.agent.send_data(stream_id, b"q", end_stream=True)
        pair.pump()
        pair.relay.send_data(stream_id, b"a", end_stream=True)
        pair.pump()
    assert pair.agent.snapshot().streams == {} and pair.relay.snapshot().streams == {}
    assert pair.agent.stream_state(stream_id) is S.CLOSED


def test_reset_memory_is_bounded(pair: Pair) -> None:
    for _ in range(RESET_MEMORY + 10):
        pair.agent.reset_stream(pair.agent.open_stream("svc"), ErrorCode.CANCEL)
    assert len(pair.agent.snapshot().recently_reset) == RESET_MEMORY


def test_data_in_flight_after_a_local_reset_is_dropped_quietly(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.send_data(stream_id, bytes(5000), end_stream=True)
    in_flight = pair.relay.data_to_send()
    pair.agent.reset_stream(stream_id, ErrorCode.CANCEL, "user closed the port")
    pair.agent.data_to_send()
    assert pair.agent.receive_data(in_flight, 0.0) == []
    assert pair.agent.data_to_send() == b"", "no RESET answers data for a stream we reset"
    assert pair.agent.receive_data(raw_frame(FrameType.WINDOW, stream_id, b"\0\0\0\1"), 0.0) == []
    assert pair.agent.receive_data(raw_frame(FrameType.RESET, stream_id, b"\0\0\0\7"), 0.0) == []
    assert not pair.agent.closed


def test_data_on_a_stream_the_peer_closed_cleanly_gets_one_reset(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.end_stream(stream_id)
    pair.pump()
    pair.relay.end_stream(stream_id)
    pair.pump()
    assert pair.agent.receive_data(raw_frame(FrameType.DATA, stream_id, b"zombie"), 0.0) == []
    assert [f[0] for f in read_frames(pair.agent.data_to_send())] == [FrameType.RESET]
    assert pair.agent.receive_data(raw_frame(FrameType.DATA, stream_id, b"zombie"), 0.0) == []
    assert pair.agent.data_to_send() == b""


def test_a_peer_reset_emits_stream_reset_and_forgets_the_stream(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.reset_stream(stream_id, ErrorCode.SERVICE_UNAVAILABLE, "no gateway binds svc")
    _, events = pair.pump()
    assert events == [StreamReset(stream_id, ErrorCode.SERVICE_UNAVAILABLE, "no gateway binds svc", True)]
    assert pair.agent.open_stream_ids == set()


@pytest.mark.parametrize("misuse", [
    lambda c, sid: c.send_data(sid, b"x"),
    lambda c, sid: c.end_stream(sid),
    lambda c, sid: c.accept_stream(sid),
    lambda c, sid: c.reset_stream(sid, ErrorCode.CANCEL),
], ids=["data", "end", "accept", "reset"])
def test_operations_on_a_closed_stream_raise_stream_closed(pair: Pair, misuse) -> None:
    stream_id = pair.relay.open_stream("svc")
    pair.pump()
    pair.relay.reset_stream(stream_id, ErrorCode.CANCEL)
    pair.pump()
    before = snapshot(pair.agent)
    with pytest.raises(StreamClosedError):
        misuse(pair.agent, stream_id)
    assert snapshot(pair.agent) == before
    assert pair.agent.send_window(stream_id) == 0


@pytest.mark.parametrize("misuse", [
    lambda c: c.send_data(99, b"x"),
    lambda c: c.accept_stream(99),
    lambda c: c.send_window(99),
    lambda c: c.open_stream(""),
    lambda c: c.reset_stream(0, ErrorCode.CANCEL),
], ids=["data-unknown", "accept-unknown", "window-unknown", "empty-service", "stream-zero"])
def test_misuse_on_unknown_streams_raises_and_changes_nothing(pair: Pair, misuse) -> None:
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError) as caught:
        misuse(pair.agent)
    assert not isinstance(caught.value, StreamClosedError)
    assert snapshot(pair.agent) == before


def test_stream_operations_after_close_are_misuse(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.agent.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.agent.open_stream("svc")


def test_window_updates_are_reported_with_the_new_window(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    start = pair.agent.send_window(stream_id)
    assert _apply(pair, stream_id, I.RECV_WINDOW) == [WindowUpdated(stream_id, start + 1)]


def test_fin_alone_ends_the_stream_without_data(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.end_stream(stream_id)
    _, events = pair.pump()
    assert events == [StreamEnded(stream_id)]


def test_empty_data_without_fin_sends_and_reports_nothing(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.agent.send_data(stream_id, b"")
    assert pair.agent.data_to_send() == b""
    assert pair.relay.receive_data(raw_frame(FrameType.DATA, stream_id, b""), 0.0) == []


def test_opening_a_stream_takes_its_transition_from_the_table_like_every_other_local_input(
    pair: Pair, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the (IDLE, SEND_OPEN) row the table forbids opening: the open must be refused,
    # not leave a stream without a state and an OPEN frame queued.
    monkeypatch.delitem(TRANSITIONS, (S.IDLE, I.SEND_OPEN))
    with pytest.raises(LocalProtocolError, match="cannot send OPEN on stream 1"):
        pair.agent.open_stream("svc")
    assert pair.agent.open_stream_ids == set() and pair.agent.data_to_send() == b""
