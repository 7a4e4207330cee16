"""REPORT: the agent's report of itself reaches the relay; a bad one is refused alone, never the tunnel."""

from __future__ import annotations

import json

import pytest
from protocol_pairs import Pair, make_pair, raw_frame, read_frames, stream_still_works

from shared.protocol import ErrorCode, LocalProtocolError, RemoteProtocolError, ReportReceived
from shared.protocol.control import MAX_REPORT_BYTES, MAX_REPORT_ERROR_CHARS
from shared.protocol.frames import FrameType

REPORT = {
    "identity": "spiffe://example.org/acme/gw-1", "agent_version": "0.9.0", "os": "Debian GNU/Linux 12",
    "arch": "aarch64", "link_profile": "metered", "keepalive_s": 540.0, "rtt_ms": 83.5, "clock_offset_s": -0.25,
    "clock_source": "ntp", "key_backend": "tpm", "cert_not_after": 1700086400.0, "next_renewal": 1700057600.0,
    "renewal_error": None,
}


def reports(events: list) -> list[ReportReceived]:
    return [e for e in events if isinstance(e, ReportReceived)]


def test_report_reaches_the_relay_with_every_field(pair: Pair) -> None:
    size = pair.agent.send_report(REPORT)
    relay_events, _ = pair.pump()
    [event] = reports(relay_events)
    assert event.refused is None and event.report == REPORT and event.size == size
    assert pair.agent.reports == 1 and pair.relay.reports == 1


def test_unknown_fields_of_a_newer_agent_are_dropped(pair: Pair) -> None:
    pair.agent.send_report({"agent_version": "2.0", "battery_mv": 3300})
    [event] = reports(pair.pump()[0])
    assert event.report == {"agent_version": "2.0"}


@pytest.mark.parametrize("payload, why", [
    (b"{" + b" " * MAX_REPORT_BYTES + b"}", f"more than {MAX_REPORT_BYTES}"),
    (b"not json", "not JSON"),
    (b"[1,2]", "not a JSON object"),
    (b'{"rtt_ms": "fast"}', '"rtt_ms" must be a number'),
    (b'{"rtt_ms": NaN}', '"rtt_ms" must be a number'),
    (b'{"keepalive_s": 0}', '"keepalive_s" must be a positive number'),
    (b'{"cert_not_after": true}', '"cert_not_after" must be a number'),
    (b'{"os": "evil\\nline"}', '"os" must be printable text'),
    (json.dumps({"renewal_error": "x" * (MAX_REPORT_ERROR_CHARS + 1)}).encode(), '"renewal_error" must be text'),
])
def test_a_bad_report_is_refused_and_the_tunnel_lives(pair: Pair, payload: bytes, why: str) -> None:
    events = pair.relay.receive_data(raw_frame(FrameType.REPORT, 0, payload), 1.0)
    [event] = reports(events)
    assert event.report is None and event.refused is not None and why in event.refused
    assert pair.relay.data_to_send() == b""  # nothing answers a report, not even a refused one
    stream_still_works(pair)


def test_a_flood_of_reports_is_only_events() -> None:
    pair = make_pair()
    frame = raw_frame(FrameType.REPORT, 0, b"junk")
    events = pair.relay.receive_data(frame * 1000, 1.0)
    assert len(reports(events)) == 1000 and pair.relay.data_to_send() == b""
    stream_still_works(pair)


def test_a_report_past_the_control_frame_limit_ends_the_tunnel_at_its_header(pair: Pair) -> None:
    # Past 64 KiB a frame is not read at all (any control frame): the header alone is refused.
    header = bytes([FrameType.REPORT, 0]) + bytes(4) + (64 * 1024 + 1).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError) as raised:
        pair.relay.receive_data(header, 1.0)
    assert raised.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_report_before_authentication_is_a_protocol_error() -> None:
    pair = make_pair(authenticate=False)
    pair.relay.send_challenge(bytes(32))
    with pytest.raises(RemoteProtocolError, match="REPORT frame before authentication"):
        pair.relay.receive_data(raw_frame(FrameType.REPORT, 0, b"{}"), 0.0)


def test_the_agent_refuses_a_report_from_the_relay(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError, match="only an agent sends one"):
        pair.agent.receive_data(raw_frame(FrameType.REPORT, 0, b"{}"), 0.0)


def test_report_on_a_stream_is_a_protocol_error(pair: Pair) -> None:
    with pytest.raises(RemoteProtocolError, match="REPORT frame on stream 1"):
        pair.relay.receive_data(raw_frame(FrameType.REPORT, 1, b"{}"), 0.0)


def test_only_the_agent_sends_reports_and_only_within_the_size(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError, match="only the agent"):
        pair.relay.send_report(REPORT)
    with pytest.raises(LocalProtocolError, match=f"exceeds {MAX_REPORT_BYTES}"):
        pair.agent.send_report({"os": "x" * MAX_REPORT_BYTES})
    assert pair.agent.data_to_send() == b""
    unauthenticated = make_pair(authenticate=False)
    with pytest.raises(LocalProtocolError, match="not authenticated"):
        unauthenticated.agent.send_report(REPORT)


def test_the_report_frame_on_the_wire(pair: Pair) -> None:
    pair.agent.send_report({"rtt_ms": 12})
    [(frame_type, flags, stream_id, payload)] = read_frames(pair.agent.data_to_send())
    assert (frame_type, flags, stream_id, json.loads(payload)) == (0x0E, 0, 0, {"rtt_ms": 12})


def test_last_received_is_the_time_of_the_last_bytes(pair: Pair) -> None:
    pair.relay.receive_data(raw_frame(FrameType.PING, 0, bytes(8)), 42.0)
    assert pair.relay.last_received == 42.0
