"""Arbitrary bytes never crash the parser nor grow its buffer (docs/protocol.md, "Framing")."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_pairs import make_pair, raw_frame

from shared.protocol import MAX_FRAME_PAYLOAD, ProtocolLimits, RemoteProtocolError
from shared.protocol.frames import FLAG_FIN, HEADER_SIZE, FrameType

BUFFER_BOUND = HEADER_SIZE + MAX_FRAME_PAYLOAD
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Frames that are plausible enough to reach deep into the state machine.
plausible_frame = st.builds(
    raw_frame,
    st.sampled_from([int(t) for t in FrameType] + [0, 0x0E, 0xFF]),
    st.sampled_from([0, 1, 2, 3, 4, 5, 2**32 - 1]),
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"\0\0\0\1", b"\xff\xff\xff\xff", bytes(8), b'{"service":"s"}',
                         b'{"services":["a"]}', b'{"bound":[],"refused":{}}', b"\0\0\0\7reason"]),
    ),
    st.sampled_from([0, FLAG_FIN, 0xFF]),
)
byte_stream = st.one_of(st.binary(max_size=2000), st.lists(plausible_frame, max_size=30).map(b"".join))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FUZZ
@given(data=byte_stream, cuts=st.lists(st.integers(min_value=0), max_size=20), agent_side=st.booleans())
def test_arbitrary_bytes_raise_nothing_but_remote_protocol_error(data: bytes, cuts: list[int], agent_side: bool) -> None:
    pair = make_pair(relay_limits=ProtocolLimits(max_streams=2))
    pair.agent.open_stream("svc")
    pair.relay.open_stream("svc")
    pair.pump()
    conn = pair.agent if agent_side else pair.relay
    for chunk in _chunks(data, cuts):
        try:
            conn.receive_data(chunk, 1.0)
        except RemoteProtocolError:
            assert conn.closed
            break
        assert conn.buffered <= BUFFER_BOUND
        conn.handle_timer(2.0)
        conn.data_to_send()
    assert conn.buffered <= BUFFER_BOUND


@FUZZ
@given(frames=st.lists(plausible_frame, max_size=30), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_chunking_never_changes_what_a_byte_stream_means(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frames)
    outcomes = []
    for chunks in ([data], _chunks(data, cuts)):
        pair = make_pair()
        pair.agent.open_stream("svc")
        pair.pump()
        events: list = []
        error = None
        for chunk in chunks:
            try:
                events += pair.relay.receive_data(chunk, 1.0)
            except RemoteProtocolError as exc:
                events += exc.events
                error = (exc.code, str(exc))
                break
        outcomes.append((events, error, pair.relay.data_to_send()))
    assert outcomes[0] == outcomes[1]


@FUZZ
@given(size=st.integers(min_value=MAX_FRAME_PAYLOAD + 1, max_value=2**32 - 1), extra=st.binary(max_size=64))
def test_any_oversized_header_fails_before_its_payload_is_kept(size: int, extra: bytes) -> None:
    pair = make_pair()
    header = bytes([FrameType.DATA, 0]) + (1).to_bytes(4, "big") + size.to_bytes(4, "big")
    try:
        pair.relay.receive_data(header + extra, 1.0)
    except RemoteProtocolError:
        pass
    else:
        raise AssertionError("an oversized frame was accepted")
    assert pair.relay.buffered == 0
