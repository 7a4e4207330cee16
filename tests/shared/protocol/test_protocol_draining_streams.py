"""A stream closed both ways while its reader lags still holds its unread bytes, and they still count.

FIN each way closes a stream on the wire, but the application has not yet
consumed what it received: those bytes stay on the tunnel's receive budget,
and a stream the peer opened stays on its open streams, until the reader
acknowledges them or resets the stream. Otherwise a peer could open a
stream, fill its window, end it, and do it again, parking a window per
stream beyond any bound.
"""

from __future__ import annotations

import pytest
from protocol_pairs import Pair, make_pair, read_frames

from shared.protocol import (
    ErrorCode,
    LocalProtocolError,
    ProtocolLimits,
    StreamClosedError,
    StreamOpened,
    StreamReset,
    StreamState,
)
from shared.protocol.frames import FrameType

WINDOW = 1000
BUDGET = 2500


def budget_pair(max_streams: int = 256) -> Pair:
    return make_pair(agent_limits=ProtocolLimits(initial_window=WINDOW, receive_budget=BUDGET, max_streams=max_streams))


def closed_while_unread(pair: Pair, size: int) -> int:
    """A relay-opened stream that sent ``size`` bytes and FIN, ended by the agent unread; its id."""
    stream_id = pair.relay.open_stream("svc")
    pair.relay.send_data(stream_id, bytes(size), end_stream=True)
    pair.pump()
    pair.agent.end_stream(stream_id)
    pair.pump()
    assert pair.agent.stream_state(stream_id) is StreamState.CLOSED
    assert stream_id not in pair.agent.open_stream_ids
    return stream_id


def test_a_stream_closed_both_ways_keeps_its_unread_bytes_on_the_budget_until_its_reader_acknowledges_them() -> None:
    pair = budget_pair()
    stream_id = closed_while_unread(pair, 800)
    assert pair.agent.unread_bytes == 800
    pair.agent.acknowledge_received(stream_id, 500)
    assert pair.agent.unread_bytes == 300
    with pytest.raises(LocalProtocolError, match="only 300 unacknowledged bytes"):
        pair.agent.acknowledge_received(stream_id, 301)
    pair.agent.acknowledge_received(stream_id, 300)
    assert pair.agent.unread_bytes == 0
    # Closed on the wire: no credit goes back for it, and a late acknowledgement is harmless.
    assert pair.agent.data_to_send() == b""
    pair.agent.acknowledge_received(stream_id, 0)
    assert pair.agent.unread_bytes == 0


def test_over_the_budget_a_closed_stream_furthest_behind_is_the_one_reset_and_only_this_end_hears_of_it() -> None:
    pair = budget_pair()
    first = closed_while_unread(pair, 1000)
    second = closed_while_unread(pair, 900)
    live = pair.relay.open_stream("live")
    pair.relay.send_data(live, bytes(700))  # 1,000 + 900 + 700 unread: over the 2,500 budget
    events = pair.agent.receive_data(pair.relay.data_to_send(), 0.0)
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.code, e.remote) for e in resets] == [(first, ErrorCode.CANCEL, False)]
    assert "fell 1000 bytes behind" in resets[0].reason
    # The relay forgot that stream when both FINs crossed: nothing goes on the wire for it.
    assert [frame for frame in read_frames(pair.agent.data_to_send()) if frame[0] == FrameType.RESET] == []
    assert pair.agent.unread_bytes == 1600
    assert pair.agent.stream_state(live) is StreamState.OPEN_UNACCEPTED
    pair.agent.acknowledge_received(second, 900)
    assert pair.agent.unread_bytes == 700


def test_a_peer_that_opens_fills_and_ends_stream_after_stream_never_parks_more_than_the_budget() -> None:
    pair = budget_pair()
    resets = []
    for _ in range(20):  # 20 full windows, each ended at once, none read
        stream_id = pair.relay.open_stream("svc")
        pair.relay.send_data(stream_id, bytes(WINDOW), end_stream=True)
        _, events = pair.pump()
        resets += [e for e in events if isinstance(e, StreamReset)]
        if pair.agent.stream_state(stream_id) is not StreamState.CLOSED:
            pair.agent.end_stream(stream_id)
            pair.pump()
        assert pair.agent.unread_bytes <= BUDGET
    assert len(resets) == 20 - BUDGET // WINDOW
    assert not pair.agent.closed and not pair.relay.closed


def test_resetting_a_closed_stream_whose_reader_lags_drops_its_bytes_and_sends_nothing() -> None:
    pair = budget_pair()
    stream_id = closed_while_unread(pair, 600)
    pair.agent.reset_stream(stream_id, ErrorCode.CANCEL)
    assert pair.agent.unread_bytes == 0
    assert pair.agent.data_to_send() == b""
    with pytest.raises(StreamClosedError):
        pair.agent.reset_stream(stream_id, ErrorCode.CANCEL)


def test_streams_the_peer_opened_count_against_its_open_streams_until_their_readers_catch_up() -> None:
    pair = budget_pair(max_streams=2)
    a = closed_while_unread(pair, 100)
    closed_while_unread(pair, 100)
    refused = pair.relay.open_stream("third")
    relay_events, agent_events = pair.pump()
    assert not any(isinstance(e, StreamOpened) for e in agent_events)
    assert [(e.stream_id, e.code) for e in relay_events if isinstance(e, StreamReset)] == [
        (refused, ErrorCode.REFUSED_STREAM)
    ]
    pair.agent.acknowledge_received(a, 100)  # one reader caught up: its place is free
    accepted = pair.relay.open_stream("fourth")
    _, agent_events = pair.pump()
    assert [e.stream_id for e in agent_events if isinstance(e, StreamOpened)] == [accepted]


def test_closing_the_tunnel_drops_the_closed_streams_bytes_too() -> None:
    pair = budget_pair()
    closed_while_unread(pair, 700)
    pair.agent.close()
    assert pair.agent.unread_bytes == 0
