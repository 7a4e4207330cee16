"""Framing: every frame type round-trips, and bad bytes fail at the header."""

from __future__ import annotations

import pytest
from protocol_pairs import NONCE, Pair, make_pair, raw_frame, read_frames

from shared.protocol import (
    MAX_FRAME_PAYLOAD,
    BindCompleted,
    BindRequested,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    PongReceived,
    ProtocolLimits,
    RemoteProtocolError,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from shared.protocol.frames import FLAG_FIN, HEADER_SIZE, FrameType, decode_code_reason, encode_code_reason
from shared.protocol.limits import MAX_REASON_BYTES


def test_header_layout_is_type_flags_stream_length_big_endian() -> None:
    pair = make_pair()
    stream_id = pair.agent.open_stream("svc")
    pair.agent.data_to_send()
    pair.agent.send_data(stream_id, b"abc", end_stream=True)
    assert pair.agent.data_to_send() == b"\x06\x01\x00\x00\x00\x01\x00\x00\x00\x03abc"


def test_open_accept_data_fin_round_trip(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("modbus")
    pair.agent.send_data(stream_id, b"request", end_stream=True)
    relay_events, _ = pair.pump()
    assert relay_events == [StreamOpened(stream_id, "modbus", None), DataReceived(stream_id, b"request"),
                            StreamEnded(stream_id)]
    pair.relay.accept_stream(stream_id)
    pair.relay.send_data(stream_id, b"reply")
    pair.relay.end_stream(stream_id)
    _, agent_events = pair.pump()
    assert agent_events == [StreamAccepted(stream_id), DataReceived(stream_id, b"reply"), StreamEnded(stream_id)]
    assert pair.agent.open_stream_ids == set() and pair.relay.open_stream_ids == set()


def test_open_from_the_relay_names_the_dialing_peer(pair: Pair) -> None:
    stream_id = pair.relay.open_stream("ssh", peer="spiffe://example.org/acme/ops")
    _, agent_events = pair.pump()
    assert agent_events == [StreamOpened(stream_id, "ssh", "spiffe://example.org/acme/ops")]
    assert stream_id % 2 == 0


def test_reset_round_trips_with_code_and_reason(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.reset_stream(stream_id, ErrorCode.POLICY_DENIED, "no policy lets gw-1 dial svc")
    _, agent_events = pair.pump()
    assert agent_events == [StreamReset(stream_id, ErrorCode.POLICY_DENIED, "no policy lets gw-1 dial svc", True)]


def test_window_round_trips(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, bytes(1_500_000))
    pair.pump()
    pair.relay.acknowledge_received(stream_id, 1_500_000)
    _, agent_events = pair.pump()
    assert agent_events == [WindowUpdated(stream_id, pair.agent.limits.initial_window)]


def test_ping_is_answered_with_pong_and_measures_rtt(pair: Pair) -> None:
    pair.agent.ping(10.0)
    [(frame_type, _, _, payload)] = read_frames(pair.agent.data_to_send())
    assert frame_type == FrameType.PING and len(payload) == 8
    pair.relay.receive_data(raw_frame(FrameType.PING, 0, payload), 10.1)
    pong = pair.relay.data_to_send()
    assert read_frames(pong) == [(FrameType.PONG, 0, 0, payload)]
    assert pair.agent.receive_data(pong, 10.25) == [PongReceived(pytest.approx(0.25))]
    assert pair.agent.last_rtt == pytest.approx(0.25)


def test_unsolicited_pong_is_ignored(pair: Pair) -> None:
    assert pair.agent.receive_data(raw_frame(FrameType.PONG, 0, bytes(8)), 1.0) == []
    assert not pair.agent.closed


def test_bind_and_bind_result_round_trip(pair: Pair) -> None:
    pair.agent.send_bind(["modbus", "ssh"])
    relay_events, _ = pair.pump()
    assert relay_events == [BindRequested(("modbus", "ssh"))]
    pair.relay.send_bind_result(["modbus"], {"ssh": "no policy lets gw-1 bind ssh"})
    _, agent_events = pair.pump()
    assert agent_events == [BindCompleted(("modbus",), {"ssh": "no policy lets gw-1 bind ssh"})]


def test_an_unrequested_bind_result_is_refused(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError):
        pair.agent.receive_data(raw_frame(FrameType.BIND_RESULT, 0, b'{"bound":[],"refused":{}}'), 0.0)


def test_goaway_round_trips_and_closes_both_ends(pair: Pair) -> None:
    pair.agent.open_stream("svc")
    pair.agent.close(ErrorCode.NO_ERROR, "agent shutting down")
    assert pair.agent.closed and pair.agent.open_stream_ids == set()
    relay_events, _ = pair.pump()
    assert relay_events[-1] == ConnectionTerminated(ErrorCode.NO_ERROR, "agent shutting down", remote=True)
    assert pair.relay.closed and pair.relay.get_timer() is None
    assert pair.relay.receive_data(raw_frame(FrameType.PING, 0, bytes(8)), 0.0) == []


def test_bytes_after_goaway_in_the_same_chunk_are_ignored(pair: Pair) -> None:
    data = raw_frame(FrameType.GOAWAY, 0, b"\0\0\0\0bye") + b"\xff" * 20
    assert pair.agent.receive_data(data, 0.0) == [ConnectionTerminated(ErrorCode.NO_ERROR, "bye", remote=True)]


def test_counters_count_frame_bytes_both_ways(pair: Pair) -> None:
    sent_before, received_before = pair.agent.bytes_sent, pair.relay.bytes_received
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, bytes(1000))
    pair.pump()
    assert pair.agent.bytes_sent - sent_before == pair.relay.bytes_received - received_before
    assert pair.agent.bytes_sent - sent_before >= 1000 + 2 * HEADER_SIZE


def test_reasons_are_truncated_on_a_character_boundary() -> None:
    payload = encode_code_reason(ErrorCode.CANCEL, "é" * 2000)
    code, reason = decode_code_reason(payload)
    assert code is ErrorCode.CANCEL
    assert len(payload) - 4 <= MAX_REASON_BYTES and reason == "é" * (MAX_REASON_BYTES // 2)


def test_unknown_error_codes_read_as_internal_error(pair: Pair) -> None:
    events = pair.agent.receive_data(raw_frame(FrameType.GOAWAY, 0, b"\0\0\1\0future"), 0.0)
    assert events == [ConnectionTerminated(ErrorCode.INTERNAL_ERROR, "future", remote=True)]


# -- bad input ------------------------------------------------------------------


def test_oversized_frame_fails_at_the_header_without_buffering_the_payload(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    header = raw_frame(FrameType.DATA, stream_id)[:6] + (MAX_FRAME_PAYLOAD + 1).to_bytes(4, "big")
    pair.relay.receive_data(header[:7], 0.0)
    assert pair.relay.buffered == 7
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(header[7:] + b"x", 0.0)
    assert caught.value.code is ErrorCode.FRAME_SIZE_ERROR
    assert pair.relay.buffered == 0 and pair.relay.closed
    goaway = read_frames(pair.relay.data_to_send())[-1]
    assert goaway[0] == FrameType.GOAWAY and decode_code_reason(goaway[3])[0] is ErrorCode.FRAME_SIZE_ERROR


def test_oversized_control_frame_fails_at_the_header(pair: Pair) -> None:
    header = bytes([FrameType.BIND, 0]) + bytes(4) + (64 * 1024 + 1).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(header, 0.0)
    assert caught.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_a_frame_at_the_size_limit_is_accepted() -> None:
    limits = ProtocolLimits(initial_window=4 * MAX_FRAME_PAYLOAD)
    pair = make_pair(relay_limits=limits, agent_limits=limits)
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    events = pair.relay.receive_data(raw_frame(FrameType.DATA, stream_id, bytes(MAX_FRAME_PAYLOAD)), 0.0)
    assert events == [DataReceived(stream_id, bytes(MAX_FRAME_PAYLOAD))]


def test_unknown_frame_type_is_a_protocol_error(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        pair.agent.receive_data(raw_frame(0x7F, 0, b"?"), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR and "0x7f" in str(caught.value)


def test_garbage_bytes_are_a_connection_error() -> None:
    agent = Connection(Role.AGENT, 0.0)
    with pytest.raises(RemoteProtocolError):
        agent.receive_data(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", 0.0)
    assert agent.closed
    assert read_frames(agent.data_to_send())[0][0] == FrameType.GOAWAY


@pytest.mark.parametrize("frame_type,stream_id,payload", [
    (FrameType.PING, 1, bytes(8)),
    (FrameType.GOAWAY, 3, b"\0\0\0\0"),
    (FrameType.BIND, 1, b'{"services":[]}'),
    (FrameType.DATA, 0, b"x"),
    (FrameType.WINDOW, 0, b"\0\0\0\1"),
    (FrameType.OPEN, 0, b'{"service":"x"}'),
    (FrameType.RESET, 0, b"\0\0\0\0"),
    (FrameType.ACCEPT, 0, b""),
], ids=lambda v: v.name if isinstance(v, FrameType) else None)
def test_a_frame_on_the_wrong_kind_of_stream_is_a_protocol_error(pair: Pair, frame_type, stream_id, payload) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(raw_frame(frame_type, stream_id, payload), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("frame_type,payload", [
    (FrameType.PING, bytes(7)),
    (FrameType.PONG, bytes(9)),
    (FrameType.GOAWAY, b"\0\0"),
])
def test_fixed_size_control_payloads_of_the_wrong_size_are_refused(pair: Pair, frame_type, payload) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        pair.agent.receive_data(raw_frame(frame_type, 0, payload), 0.0)
    assert caught.value.code is ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("payload", [b"{", b'{"service":""}', b'{"service":7}', b'"svc"'])
def test_malformed_open_is_a_connection_error(pair: Pair, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(raw_frame(FrameType.OPEN, 1, payload), 0.0)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


def test_an_agent_may_not_name_the_dialing_peer(pair: Pair) -> None:
    # The relay takes identities only from its own authentication.
    with pytest.raises(RemoteProtocolError, match="only the relay"):
        pair.relay.receive_data(raw_frame(FrameType.OPEN, 1, b'{"service":"s","peer":"spiffe://x/y/admin"}'), 0.0)


def test_events_parsed_before_a_violation_are_kept_on_the_error(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    data = raw_frame(FrameType.DATA, stream_id, b"ok") + raw_frame(0x7F, 0)
    with pytest.raises(RemoteProtocolError) as caught:
        pair.relay.receive_data(data, 0.0)
    assert caught.value.events == [DataReceived(stream_id, b"ok")]


def _conversation() -> tuple[Pair, bytes]:
    """An authenticated pair and a byte stream the agent sent, covering many frame types."""
    pair = make_pair()
    agent = pair.agent
    first = agent.open_stream("svc")
    agent.send_data(first, bytes(range(256)) * 700)
    second = agent.open_stream("other")
    agent.send_data(second, b"hello", end_stream=True)
    agent.ping(1.0)
    agent.send_bind(["svc"])
    agent.reset_stream(first, ErrorCode.CANCEL, "changed my mind")
    return pair, agent.data_to_send()


def test_one_byte_chunks_give_the_same_events_as_one_chunk() -> None:
    whole_pair, data = _conversation()
    whole = whole_pair.relay.receive_data(data, 2.0)
    sliced_pair, same = _conversation()
    assert same == data
    sliced = []
    for i in range(len(data)):
        sliced += sliced_pair.relay.receive_data(data[i:i + 1], 2.0)
        assert sliced_pair.relay.buffered <= HEADER_SIZE + MAX_FRAME_PAYLOAD
    assert len(whole) > 5 and sliced == whole
    assert sliced_pair.relay.data_to_send() == whole_pair.relay.data_to_send()


def test_input_may_be_a_memoryview_or_bytearray(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.agent.send_data(stream_id, b"abc", end_stream=True)
    data = pair.agent.data_to_send()
    assert pair.relay.receive_data(bytearray(data[:5]), 0.0) == []
    events = pair.relay.receive_data(memoryview(data)[5:], 0.0)
    assert events[-2:] == [DataReceived(stream_id, b"abc"), StreamEnded(stream_id)]
    assert all(type(e.data) is bytes for e in events if isinstance(e, DataReceived))


def test_flags_on_control_frames_are_ignored(pair: Pair) -> None:
    pair.relay.receive_data(raw_frame(FrameType.PING, 0, bytes(8), flags=FLAG_FIN | 0x80), 0.0)
    assert read_frames(pair.relay.data_to_send()) == [(FrameType.PONG, 0, 0, bytes(8))]


def test_challenge_nonce_goes_out_as_given() -> None:
    relay = Connection(Role.RELAY, 0.0)
    relay.send_challenge(bytearray(NONCE))
    assert read_frames(relay.data_to_send())[0][3][1:] == NONCE


@pytest.mark.parametrize("as_type", [bytes, bytearray], ids=["bytes", "bytearray"])
def test_a_frame_limit_leaves_the_rest_for_the_next_call_in_order(pair: Pair, as_type: type) -> None:
    pings = [raw_frame(FrameType.PING, 0, n.to_bytes(8, "big")) for n in range(10)]
    message = as_type(b"".join(pings))
    agent = pair.agent
    assert agent.receive_data(message, 1.0, max_frames=3) == []
    assert agent.input_pending
    if isinstance(message, bytearray):
        message[:] = bytes(len(message))  # the caller reuses its buffer: what is left was kept apart
    answered = [frame[3] for frame in read_frames(agent.data_to_send())]
    assert answered == [n.to_bytes(8, "big") for n in range(3)]
    # The rest comes first, then bytes that arrive meanwhile; b"" only continues.
    agent.receive_data(raw_frame(FrameType.PING, 0, (99).to_bytes(8, "big")), 2.0, max_frames=4)
    agent.receive_data(b"", 2.0, max_frames=4)
    assert not agent.input_pending
    answered = [int.from_bytes(frame[3], "big") for frame in read_frames(agent.data_to_send())]
    assert answered == [3, 4, 5, 6, 7, 8, 9, 99]
    assert agent.receive_data(b"", 3.0, max_frames=4) == [] and agent.data_to_send() == b""


def test_a_large_data_payload_is_a_view_of_the_received_bytes_and_a_small_one_a_copy(pair: Pair) -> None:
    """Bulk DATA is not copied on receipt, nor when passed on to another stream (the relay);
    a payload small next to its chunk is copied, so that keeping it never holds the whole chunk."""
    from shared.protocol.reader import VIEW_SHARE

    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.accept_stream(stream_id)
    pair.pump()
    bulk = bytes(range(256)) * 256  # 64 KiB, one frame
    small = b"s" * (len(bulk) // VIEW_SHARE // 2)
    pair.agent.send_data(stream_id, bulk)
    pair.agent.send_data(stream_id, small)
    chunk = pair.agent.data_to_send()

    events = pair.relay.receive_data(chunk, pair.now)

    big, little = events
    assert isinstance(big, DataReceived) and isinstance(little, DataReceived)
    assert type(big.data) is memoryview and big.data.obj is chunk and big.data == bulk
    assert type(little.data) is bytes and little.data == small
    onward = pair.relay.open_stream("svc")
    pair.relay.send_data(onward, big.data)
    assert any(part is big.data for part in pair.relay._endpoint.out)  # queued as it came, joined once at send
    assert read_frames(pair.relay.data_to_send())[-1][3] == bulk


def test_a_payload_received_in_a_buffer_the_caller_may_reuse_is_copied(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.agent.send_data(stream_id, b"x" * 40_000)
    buffer = bytearray(pair.agent.data_to_send())

    (event,) = pair.relay.receive_data(buffer, pair.now)  # type: ignore[arg-type]

    assert isinstance(event, DataReceived) and type(event.data) is bytes
    buffer[-1:] = b"y"
    assert event.data == b"x" * 40_000


def test_only_stream_data_tells_bytes_whose_handling_never_waits(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    data = raw_frame(FrameType.DATA, stream_id, b"abc") + raw_frame(FrameType.WINDOW, stream_id, b"\x00\x00\x01\x00")
    ping = raw_frame(FrameType.PING, 0, bytes(8))

    assert pair.relay.only_stream_data(data, 10)
    assert pair.relay.only_stream_data(data + raw_frame(FrameType.DATA, stream_id, b"xyz")[:12], 10)  # partial last
    assert not pair.relay.only_stream_data(data + ping, 10)
    assert not pair.relay.only_stream_data(data, 1)  # more frames than one turn handles
    pair.relay.receive_data(raw_frame(FrameType.DATA, stream_id, b"xyz")[:5], pair.now)  # a frame left incomplete
    assert not pair.relay.only_stream_data(data, 10)
    unauthenticated = make_pair(authenticate=False)
    assert not unauthenticated.relay.only_stream_data(data, 10)
