"""GOAWAY carrying a come-back time (FLAG_RETRY_AFTER), byte by byte, and the BUSY refusal before CHALLENGE."""

from __future__ import annotations

import math

import pytest
from protocol_pairs import Pair, make_pair, raw_frame, read_frames

from shared.protocol import (
    Connection,
    ConnectionTerminated,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    goaway_frame,
)
from shared.protocol.frames import FLAG_RETRY_AFTER, FrameType


def test_a_goaway_with_a_come_back_time_is_code_then_milliseconds_then_reason() -> None:
    frame = goaway_frame(ErrorCode.BUSY, "busy", 12.345)
    assert frame == (b"\x0b" + bytes([FLAG_RETRY_AFTER]) + b"\0\0\0\0" + b"\0\0\0\x0c"
                     + b"\0\0\0\x11" + b"\0\0\x30\x39" + b"busy")


def test_a_goaway_without_a_come_back_time_keeps_its_old_layout() -> None:
    assert goaway_frame(ErrorCode.NO_ERROR, "bye") == b"\x0b\0\0\0\0\0\0\0\0\x07" + b"\0\0\0\0bye"


def test_the_come_back_time_reaches_the_agent_in_the_event_and_on_the_connection(pair: Pair) -> None:
    pair.relay.close(ErrorCode.NO_ERROR, "relay shutting down", retry_after=7.5)
    _, agent_events = pair.pump()
    assert agent_events[-1] == ConnectionTerminated(ErrorCode.NO_ERROR, "relay shutting down", remote=True,
                                                    retry_after=7.5)
    assert pair.agent.retry_after == 7.5


def test_an_agent_refused_before_challenge_reads_busy_and_its_come_back_time() -> None:
    agent = Connection(Role.AGENT, 0.0)
    events = agent.receive_data(goaway_frame(ErrorCode.BUSY, "come back later", 3.0), 0.0)
    assert events == [ConnectionTerminated(ErrorCode.BUSY, "come back later", remote=True, retry_after=3.0)]
    assert agent.closed


def test_a_plain_goaway_has_no_come_back_time(pair: Pair) -> None:
    pair.relay.close(ErrorCode.NO_ERROR, "bye")
    _, agent_events = pair.pump()
    assert agent_events[-1].retry_after is None and pair.agent.retry_after is None


def test_a_come_back_time_past_what_the_wire_holds_is_sent_as_its_largest() -> None:
    ((_, flags, _, payload),) = read_frames(goaway_frame(ErrorCode.BUSY, "", 10.0 ** 12))
    assert flags == FLAG_RETRY_AFTER and payload[4:8] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_come_back_time_the_wire_cannot_carry_is_refused_and_nothing_is_queued(bad: float) -> None:
    pair = make_pair()
    with pytest.raises(LocalProtocolError, match="come-back time"):
        pair.relay.close(ErrorCode.BUSY, "x", retry_after=bad)
    assert not pair.relay.closed and not pair.relay.wants_to_send


def test_the_flag_with_a_payload_too_short_for_the_time_is_a_frame_size_error() -> None:
    agent = Connection(Role.AGENT, 0.0)
    with pytest.raises(RemoteProtocolError) as caught:
        agent.receive_data(raw_frame(FrameType.GOAWAY, 0, b"\0\0\0\x11\0\0", flags=FLAG_RETRY_AFTER), 0.0)
    assert caught.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_a_come_back_time_of_zero_is_carried_as_zero_for_the_agent_to_judge() -> None:
    agent = Connection(Role.AGENT, 0.0)
    (event,) = agent.receive_data(raw_frame(FrameType.GOAWAY, 0, b"\0\0\0\x11\0\0\0\0", flags=FLAG_RETRY_AFTER), 0.0)
    assert event.retry_after == 0.0 and event.code is ErrorCode.BUSY
