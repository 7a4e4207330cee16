"""A link between two relays: only there may the dialing end name the dialer in OPEN, and only once both ends say so."""

from __future__ import annotations

import json

import pytest
from protocol_pairs import make_pair, raw_frame

from shared.protocol import LocalProtocolError, RemoteProtocolError, StreamOpened
from shared.protocol.frames import FrameType

DIALER = "spiffe://example.org/acme/operator#c-123"


def test_on_a_relay_link_the_dialing_end_names_the_dialer() -> None:
    pair = make_pair()
    pair.agent.mark_relay_link()  # relay A, dialing
    pair.relay.mark_relay_link()  # relay B, once AUTH proved A a relay
    stream_id = pair.agent.open_stream("acme/modbus@gw-1", peer=DIALER)
    relay_events, _ = pair.pump()
    assert relay_events == [StreamOpened(stream_id, "acme/modbus@gw-1", DIALER)]


def test_a_gateway_may_not_name_a_dialer() -> None:
    pair = make_pair()
    with pytest.raises(LocalProtocolError, match="only the relay names the dialing peer"):
        pair.agent.open_stream("modbus", peer=DIALER)


def test_an_unmarked_relay_refuses_an_open_that_names_a_dialer() -> None:
    # What a gateway sending a hand-built OPEN with a peer gets, even if it claims to be a link.
    pair = make_pair()
    payload = json.dumps({"service": "modbus", "peer": DIALER}).encode()
    with pytest.raises(RemoteProtocolError, match="only the relay may name the dialing peer"):
        pair.relay.receive_data(raw_frame(FrameType.OPEN, 1, payload), pair.now)
