"""Flow control: per-stream windows, credit returned only for consumed bytes."""

from __future__ import annotations

import pytest
from protocol_pairs import Pair, make_pair, raw_frame, read_frames, snapshot

from shared.protocol import (
    INITIAL_WINDOW,
    MAX_SEND_PAYLOAD,
    MAX_WINDOW,
    DataReceived,
    ErrorCode,
    InvalidLimits,
    LocalProtocolError,
    ProtocolLimits,
    RemoteProtocolError,
    StreamEnded,
    StreamReset,
    StreamState,
    WindowUpdated,
)
from shared.protocol.frames import FLAG_FIN, FrameType

WINDOW = 64 * 1024
# Bounds the pumping loop of the two-stream test: enough rounds to move 1 MiB
# through a 64 KiB window, far fewer than a runaway loop would take.
MAX_ROUNDS = 200


def _received(events: list, stream_id: int) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id)


def test_a_slow_consumer_stops_its_own_stream_and_no_other() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    slow = pair.agent.open_stream("slow")
    fast = pair.agent.open_stream("fast")
    pair.pump()
    total = 1024 * 1024
    sent = {slow: 0, fast: 0}
    delivered = {slow: 0, fast: 0}
    for _ in range(MAX_ROUNDS):
        for stream_id in (slow, fast):
            room = min(pair.agent.send_window(stream_id), total - sent[stream_id])
            if room:
                pair.agent.send_data(stream_id, bytes(room))
                sent[stream_id] += room
        relay_events, _ = pair.pump()
        for stream_id in (slow, fast):
            delivered[stream_id] += _received(relay_events, stream_id)
        # Only the fast stream's application consumes what it receives.
        unacknowledged = pair.relay.snapshot().streams[fast].unacknowledged
        if unacknowledged:
            pair.relay.acknowledge_received(fast, unacknowledged)
        if delivered[fast] == total:
            break
    assert delivered[fast] == total, "the fast stream must not be held back by the slow one"
    assert delivered[slow] == WINDOW and pair.agent.send_window(slow) == 0
    assert pair.relay.snapshot().streams[slow].unacknowledged == WINDOW, "the receiver buffers at most one window"

    # The slow consumer catches up: its window comes back and data flows again.
    pair.relay.acknowledge_received(slow, WINDOW)
    _, agent_events = pair.pump()
    assert WindowUpdated(slow, WINDOW) in agent_events
    pair.agent.send_data(slow, b"more")
    relay_events, _ = pair.pump()
    assert relay_events == [DataReceived(slow, b"more")]


def test_credit_is_batched_until_half_the_window_is_owed() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, bytes(WINDOW))
    pair.pump()
    pair.relay.acknowledge_received(stream_id, WINDOW // 2 - 1)
    assert pair.relay.data_to_send() == b""
    pair.relay.acknowledge_received(stream_id, 1)
    assert read_frames(pair.relay.data_to_send()) == [
        (FrameType.WINDOW, 0, stream_id, (WINDOW // 2).to_bytes(4, "big"))
    ]


def test_no_credit_is_sent_once_the_peer_finished_sending() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, bytes(WINDOW), end_stream=True)
    pair.pump()
    pair.relay.acknowledge_received(stream_id, WINDOW)
    assert pair.relay.data_to_send() == b""


def test_acknowledging_a_closed_stream_is_ignored(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"abc")
    pair.pump()
    pair.relay.reset_stream(stream_id, ErrorCode.CANCEL)
    pair.relay.data_to_send()
    pair.relay.acknowledge_received(stream_id, 3)
    pair.relay.acknowledge_received(12345, 3)
    assert pair.relay.data_to_send() == b""


def test_acknowledging_more_than_was_received_is_misuse(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"abc")
    pair.pump()
    before = snapshot(pair.relay)
    with pytest.raises(LocalProtocolError):
        pair.relay.acknowledge_received(stream_id, 4)
    with pytest.raises(LocalProtocolError):
        pair.relay.acknowledge_received(stream_id, -1)
    assert snapshot(pair.relay) == before


def test_sending_beyond_the_window_is_misuse_and_changes_nothing() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    stream_id = pair.agent.open_stream("svc")
    before = snapshot(pair.agent)
    with pytest.raises(LocalProtocolError) as caught:
        pair.agent.send_data(stream_id, bytes(WINDOW + 1))
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR
    assert snapshot(pair.agent) == before
    pair.agent.send_data(stream_id, bytes(WINDOW))
    assert pair.agent.send_window(stream_id) == 0


def test_data_beyond_the_receive_window_is_a_flow_control_error() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.receive_data(raw_frame(FrameType.DATA, stream_id, bytes(WINDOW)), 0.0)
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(raw_frame(FrameType.DATA, stream_id, b"x"), 0.0)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR
    assert pair.relay.closed


def test_a_window_increment_past_the_maximum_is_a_flow_control_error(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    increment = MAX_WINDOW - INITIAL_WINDOW + 1
    with pytest.raises(RemoteProtocolError) as caught:
        pair.agent.receive_data(raw_frame(FrameType.WINDOW, stream_id, increment.to_bytes(4, "big")), 0.0)
    assert caught.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_a_window_increment_up_to_the_maximum_is_accepted(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    increment = MAX_WINDOW - INITIAL_WINDOW
    events = pair.agent.receive_data(raw_frame(FrameType.WINDOW, stream_id, increment.to_bytes(4, "big")), 0.0)
    assert events == [WindowUpdated(stream_id, MAX_WINDOW)]


def test_a_zero_window_increment_is_a_protocol_error(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    with pytest.raises(RemoteProtocolError) as caught:
        pair.agent.receive_data(raw_frame(FrameType.WINDOW, stream_id, bytes(4)), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


def test_large_writes_are_split_into_chunks_with_fin_on_the_last(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.data_to_send()
    data = bytes(range(256)) * (MAX_SEND_PAYLOAD * 2 // 256) + b"tail"
    pair.agent.send_data(stream_id, data, end_stream=True)
    frames = read_frames(pair.agent.data_to_send())
    assert [len(f[3]) for f in frames] == [MAX_SEND_PAYLOAD, MAX_SEND_PAYLOAD, 4]
    assert [f[1] & FLAG_FIN for f in frames] == [0, 0, FLAG_FIN]
    assert b"".join(f[3] for f in frames) == data
    assert pair.agent.send_window(stream_id) == INITIAL_WINDOW - len(data)
    assert pair.agent.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL_UNACCEPTED


def test_a_buffer_reused_by_the_caller_does_not_change_queued_data(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    buffer = bytearray(b"first")
    pair.agent.send_data(stream_id, buffer)
    buffer[:] = b"XXXXX"
    relay_events, _ = pair.pump()
    assert DataReceived(stream_id, b"first") in relay_events


def test_receive_window_is_restored_after_acknowledgement() -> None:
    pair = make_pair(relay_limits=ProtocolLimits(initial_window=WINDOW))
    stream_id = pair.agent.open_stream("svc")
    for _ in range(5):
        pair.agent.send_data(stream_id, bytes(pair.agent.send_window(stream_id)))
        relay_events, _ = pair.pump()
        pair.relay.acknowledge_received(stream_id, _received(relay_events, stream_id))
        pair.pump()
        assert pair.agent.send_window(stream_id) == WINDOW
    pair.agent.end_stream(stream_id)
    relay_events, _ = pair.pump()
    assert relay_events == [StreamEnded(stream_id)]


def budget_pair(window: int = 1000, budget: int = 2500) -> Pair:
    return make_pair(agent_limits=ProtocolLimits(initial_window=window, receive_budget=budget))


def test_unread_bytes_of_all_streams_stay_within_the_tunnels_receive_budget() -> None:
    pair = budget_pair()
    streams = [pair.relay.open_stream("svc") for _ in range(5)]
    for sid in streams:
        pair.relay.send_data(sid, bytes(1000))  # a full window each: 5,000 bytes against a 2,500 budget
    relay_events, events = pair.pump()
    assert pair.agent.unread_bytes <= 2500
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert len(resets) == 3 and all(not e.remote and e.code is ErrorCode.CANCEL for e in resets)
    assert "holds at most 2500 unread bytes" in resets[0].reason
    # The relay hears of it as a RESET, not a tunnel error.
    assert {e.stream_id for e in relay_events if isinstance(e, StreamReset)} == {e.stream_id for e in resets}
    assert not pair.relay.closed and not pair.agent.closed


def test_the_stream_furthest_behind_is_the_one_reset_and_the_others_keep_flowing() -> None:
    pair = budget_pair()
    slow, busy, third = (pair.relay.open_stream(name) for name in ("slow", "busy", "third"))
    pair.relay.send_data(slow, bytes(1000))  # its reader never comes back
    pair.pump()
    for _ in range(5):  # the busy stream's reader keeps up: 5,000 bytes, never a problem
        pair.relay.send_data(busy, bytes(1000))
        pair.pump()
        pair.agent.acknowledge_received(busy, 1000)
        pair.pump()
    pair.relay.send_data(third, bytes(900))
    pair.relay.send_data(busy, bytes(700))  # 1,000 + 900 + 700 unread: over the 2,500 budget
    _, events = pair.pump()
    assert [e.stream_id for e in events if isinstance(e, StreamReset)] == [slow]
    assert pair.agent.stream_state(busy) is pair.agent.stream_state(third) is StreamState.OPEN_UNACCEPTED
    assert pair.agent.unread_bytes == 1600


def test_acknowledged_and_reset_bytes_leave_the_budget() -> None:
    pair = budget_pair()
    a, b = pair.relay.open_stream("a"), pair.relay.open_stream("b")
    pair.relay.send_data(a, bytes(800))
    pair.relay.send_data(b, bytes(600))
    pair.pump()
    assert pair.agent.unread_bytes == 1400
    pair.agent.acknowledge_received(a, 300)
    assert pair.agent.unread_bytes == 1100
    pair.agent.reset_stream(b, ErrorCode.CANCEL)
    assert pair.agent.unread_bytes == 500


def test_a_window_larger_than_the_receive_budget_is_refused() -> None:
    with pytest.raises(InvalidLimits, match="must not exceed the tunnel's receive budget"):
        ProtocolLimits(initial_window=2 << 20, receive_budget=1 << 20)


def test_unsent_bytes_count_what_is_queued_until_it_is_taken() -> None:
    """What a splice reads to hold back bytes from a tunnel whose peer stopped reading."""
    pair = make_pair()
    stream_id = pair.agent.open_stream("bulk")
    pair.agent.send_data(stream_id, bytes(3 * MAX_SEND_PAYLOAD + 1))
    pair.agent.ping(pair.now)
    queued = pair.agent.unsent_bytes
    assert queued > 3 * MAX_SEND_PAYLOAD
    assert len(pair.agent.data_to_send()) == queued
    assert pair.agent.unsent_bytes == 0


@pytest.mark.parametrize("count", [-1, True, 1.5, "3", None])
def test_an_acknowledged_count_that_is_not_a_non_negative_integer_is_refused(count: object) -> None:
    pair = make_pair()
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"abc")
    pair.pump()
    before = snapshot(pair.relay)
    with pytest.raises(LocalProtocolError, match="must be a non-negative integer"):
        pair.relay.acknowledge_received(stream_id, count)  # type: ignore[arg-type]
    assert snapshot(pair.relay) == before


def test_acknowledging_more_than_was_received_is_refused_and_names_the_counts() -> None:
    pair = make_pair()
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"abc")
    pair.pump()
    with pytest.raises(LocalProtocolError, match=f"stream {stream_id} has only 3 unacknowledged bytes, not 4"):
        pair.relay.acknowledge_received(stream_id, 4)
    pair.relay.acknowledge_received(stream_id, 3)  # the exact count still goes through


def test_data_before_authentication_and_after_close_is_refused_with_the_reason() -> None:
    pair = make_pair(authenticate=False)
    with pytest.raises(LocalProtocolError, match="not authenticated yet"):
        pair.agent.send_data(1, b"x")
    pair = make_pair()
    stream_id = pair.agent.open_stream("svc")
    pair.agent.close()
    with pytest.raises(LocalProtocolError, match="the tunnel is closed"):
        pair.agent.send_data(stream_id, b"x")
