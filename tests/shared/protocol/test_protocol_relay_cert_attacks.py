"""RELAY_CERT attacked in the core: trailing bytes, loose base64, a giant frame, pushes inside a busy stream."""

from __future__ import annotations

import base64
import struct

import pytest
from protocol_pairs import Pair, make_pair, raw_frame, stream_still_works

from shared.protocol import (
    MAX_CONTROL_PAYLOAD,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    RelayCertificateOffered,
    RemoteProtocolError,
)
from shared.protocol.frames import FrameType

DER = base64.b64encode(b"\x30\x82certificate-der").decode()
SIGNATURE = base64.b64encode(b"\x30\x45relay-signature").decode()


def offered(events: list) -> list[RelayCertificateOffered]:
    return [e for e in events if isinstance(e, RelayCertificateOffered)]


@pytest.mark.parametrize("payload", [
    f'{{"certificate": "{DER}", "signature": "{SIGNATURE}"}}trailing'.encode(),
    f'{{"certificate": "{DER}", "signature": "{SIGNATURE}"}}{{"certificate": "{DER}"}}'.encode(),
    f'{{"certificate": "{DER[:8]}\\n{DER[8:]}", "signature": "{SIGNATURE}"}}'.encode(),  # base64 with a line break
    f'{{"certificate": "{DER}==", "signature": "{SIGNATURE}"}}'.encode(),  # padding past the end
], ids=["bytes after the object", "a second object", "a line break in base64", "extra padding"])
def test_a_push_with_anything_around_the_two_fields_is_refused_alone(pair: Pair, payload: bytes) -> None:
    events = pair.agent.receive_data(raw_frame(FrameType.RELAY_CERT, 0, payload), 1.0)
    [event] = offered(events)
    assert event.refused is not None and event.certificate == b"", event
    stream_still_works(pair)


def test_a_giant_push_is_a_frame_size_error_before_it_is_read(pair: Pair) -> None:
    """Past MAX_RELAY_CERT_BYTES a push is refused alone; past the bound of every control frame the
    frame layer ends the tunnel before buffering it whole, as for any other control frame."""
    header = struct.pack(">BBII", FrameType.RELAY_CERT, 0, 0, MAX_CONTROL_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError) as raised:
        pair.agent.receive_data(header + b"{", 1.0)  # the length alone decides: the rest never has to come
    assert raised.value.code is ErrorCode.FRAME_SIZE_ERROR, raised.value


def test_pushes_inside_a_busy_stream_leave_its_bytes_whole_and_in_order(pair: Pair) -> None:
    stream_id = pair.agent.open_stream("svc")
    pair.pump()
    pair.relay.accept_stream(stream_id)
    pair.pump()
    push = raw_frame(FrameType.RELAY_CERT, 0, f'{{"certificate": "{DER}", "signature": "{SIGNATURE}"}}'.encode())
    wire = b""
    sent = b""
    for i in range(50):  # bounded: 50 chunks of 1 KiB, a push after every fifth
        chunk = bytes([i]) * 1024
        pair.relay.send_data(stream_id, chunk)
        sent += chunk
        wire += pair.relay.data_to_send()
        if i % 5 == 0:
            wire += push
    events: list = []
    for start in range(0, len(wire), 333):  # cut across frame boundaries, as TCP does
        events += pair.agent.receive_data(wire[start:start + 333], 1.0)
    received = b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))
    assert received == sent and len(offered(events)) == 10
    assert all(e.refused is None for e in offered(events))
    assert not any(isinstance(e, ConnectionTerminated) for e in events) and not pair.agent.closed


def test_on_a_relay_link_a_push_reaches_the_dialing_relay_only_as_an_event() -> None:
    """A relay never pushes on a link (controller/relay/cert_push.py), and one that did would not cut the
    link: the dialing end's session ignores the event (shared/tunnel/dispatch.py) and nothing goes back."""
    pair = make_pair()
    pair.agent.mark_relay_link()
    pair.relay.mark_relay_link()
    pair.relay.send_relay_certificate(b"\x30\x03der", b"sig")
    _, events = pair.pump()
    assert len(offered(events)) == 1 and pair.agent.data_to_send() == b"" and not pair.agent.closed
