"""RELAY_CERT: the relay's renewed certificate reaches the agent; an unreadable one is refused alone."""

from __future__ import annotations

import base64
import json

import pytest
from protocol_pairs import NONCE, Pair, make_pair, raw_frame, read_frames, stream_still_works

from shared.protocol import (
    MAX_RELAY_CERT_BYTES,
    LocalProtocolError,
    RelayCertificateOffered,
    RemoteProtocolError,
    relay_cert_message,
)
from shared.protocol.frames import FrameType

DER = b"\x30\x82certificate-der"
SIGNATURE = b"\x30\x45relay-signature"


def offered(events: list) -> list[RelayCertificateOffered]:
    return [e for e in events if isinstance(e, RelayCertificateOffered)]


def test_a_pushed_certificate_reaches_the_agent(pair: Pair) -> None:
    size = pair.relay.send_relay_certificate(DER, SIGNATURE)
    _, agent_events = pair.pump()
    [event] = offered(agent_events)
    assert (event.certificate, event.signature, event.refused) == (DER, SIGNATURE, None)
    assert pair.relay.relay_certificates == 1 and pair.agent.relay_certificates == 1
    assert 0 < size < 200 and not pair.agent.closed


def test_the_frame_on_the_wire(pair: Pair) -> None:
    pair.relay.send_relay_certificate(DER, SIGNATURE)
    [(frame_type, flags, stream_id, payload)] = read_frames(pair.relay.data_to_send())
    assert (frame_type, flags, stream_id) == (0x0F, 0, 0)
    assert json.loads(payload) == {"certificate": base64.b64encode(DER).decode(),
                                   "signature": base64.b64encode(SIGNATURE).decode()}


def test_the_binding_names_the_tunnel_and_the_certificate() -> None:
    digest = bytes(32 * [7])
    assert relay_cert_message(NONCE, digest) == b"outpost-relay-cert-v1\0" + NONCE + digest
    assert relay_cert_message(bytes(32), digest) != relay_cert_message(NONCE, digest)


@pytest.mark.parametrize("payload, why", [
    (b"{" + b" " * MAX_RELAY_CERT_BYTES + b"}", f"more than {MAX_RELAY_CERT_BYTES}"),
    (b"not json", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"certificate": 5, "signature": ""}', '"certificate" must be base64'),
    (b'{"certificate": "AAAA", "signature": "%%%"}', '"signature" is not valid base64'),
])
def test_an_unreadable_push_is_refused_alone(pair: Pair, payload: bytes, why: str) -> None:
    events = pair.agent.receive_data(raw_frame(FrameType.RELAY_CERT, 0, payload), 1.0)
    [event] = offered(events)
    assert event.refused is not None and why in event.refused and event.certificate == b""
    assert pair.agent.data_to_send() == b""
    stream_still_works(pair)


def test_the_relay_refuses_a_relay_cert_from_an_agent(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError, match="only a relay sends one"):
        pair.relay.receive_data(raw_frame(FrameType.RELAY_CERT, 0, b"{}"), 0.0)


def test_relay_cert_before_authentication_is_a_protocol_error() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(NONCE)
    pair.pump()
    with pytest.raises(RemoteProtocolError, match="RELAY_CERT frame before authentication"):
        pair.agent.receive_data(raw_frame(FrameType.RELAY_CERT, 0, b"{}"), 0.0)


def test_only_an_authenticated_relay_sends_it(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError, match="only the relay"):
        pair.agent.send_relay_certificate(DER, SIGNATURE)
    with pytest.raises(LocalProtocolError, match=f"exceeds {MAX_RELAY_CERT_BYTES}"):
        pair.relay.send_relay_certificate(bytes(MAX_RELAY_CERT_BYTES), SIGNATURE)
    assert pair.relay.data_to_send() == b""
    unauthenticated = make_pair(authenticate=False)
    with pytest.raises(LocalProtocolError, match="not authenticated"):
        unauthenticated.relay.send_relay_certificate(DER, SIGNATURE)


def test_relay_cert_on_a_stream_is_a_protocol_error(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError, match="RELAY_CERT frame on stream 1"):
        pair.agent.receive_data(raw_frame(FrameType.RELAY_CERT, 1, b"{}"), 0.0)


def test_a_flood_of_pushes_is_only_events(pair: Pair) -> None:
    """Each push costs the agent a parse and a check, and nothing on the wire."""
    frame = raw_frame(FrameType.RELAY_CERT, 0, b'{"certificate": "AA==", "signature": "AA=="}')
    events = pair.agent.receive_data(frame * 1000, 1.0)
    assert len(offered(events)) == 1000 and pair.agent.data_to_send() == b""
    stream_still_works(pair)
