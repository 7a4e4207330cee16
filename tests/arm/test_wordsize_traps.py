"""Traps of a 32-bit gateway, checked on purpose.

Debian 12's armhf userland (32-bit Raspberry Pi OS is the same) has a 32-bit
``time_t``, 32-bit pointers and at most 3 GiB of address space per process.
These tests run on every architecture: the ARM lane runs them on emulated
armhf and arm64 (scripts/test-arm), where they mean the most, and the normal
suite runs them on the host as their 64-bit control.
"""

from __future__ import annotations

import datetime
import importlib
import pkgutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import agent.status_view as status_view
import shared.protocol as protocol_package
from agent.enrollment.token import MAX_TOKEN_FILE, read_token_file, verify_token
from agent.errors import OutpostError
from agent.identity.tls_trust import check_dates
from shared.protocol import Connection, ProtocolLimits, Role
from shared.protocol.frames import PING_COUNTER, FrameType, encode_frame
from shared.protocol.limits import MAX_FRAME_PAYLOAD, MAX_STREAMS, MAX_WINDOW, RECEIVE_BUDGET
from shared.utc import format_utc
from tests.agent.enrollment.fake_controller import TestCA

# The first second a signed 32-bit time_t cannot hold: 2038-01-19 03:14:08 UTC.
Y2038 = 2**31
UTC = datetime.UTC
# A CA made in mid-2028 with the controller's ten-year lifetime expires past 2038.
CA_NOT_AFTER = datetime.datetime(2040, 6, 1, 12, 0, tzinfo=UTC)
# The whole of what one tunnel may hold for its readers, plus one frame being
# read and the table of its open streams, must fit many times into a 32-bit
# process on a 1 GiB gateway: an eighth of a gigabyte.
TUNNEL_MEMORY_CEILING = 128 * 1024 * 1024
# What one idle open stream may cost in the protocol core (its table entry and
# bookkeeping); a window's bytes are only held once they arrive.
IDLE_STREAM_CEILING = 16 * 1024


def test_moments_past_2038_are_written_as_dates() -> None:
    assert format_utc(Y2038) == "2038-01-19 03:14 UTC"
    assert format_utc(CA_NOT_AFTER.timestamp()) == "2040-06-01 12:00 UTC"
    # What `outpost-agent status` prints for a certificate's expiry, a year and a half away.
    moment = CA_NOT_AFTER.timestamp()
    assert status_view._when(moment, moment - 548 * 86400) == "2040-06-01 12:00 UTC (in 548 d 0 h)"


def _certificate(not_before: datetime.datetime, not_after: datetime.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outpost CA made in 2028")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))


def test_a_certificate_valid_past_2038_is_accepted_then_refused_naming_its_dates() -> None:
    cert = _certificate(datetime.datetime(2028, 6, 1, tzinfo=UTC), CA_NOT_AFTER)
    check_dates(cert, datetime.datetime(2039, 3, 1, tzinfo=UTC).timestamp(), "the controller's CA", True)
    with pytest.raises(OutpostError) as refused:
        check_dates(cert, datetime.datetime(2041, 1, 1, tzinfo=UTC).timestamp(), "the controller's CA", True)
    message = str(refused.value)
    assert "2040-06-01 12:00 UTC" in message and "2041-01-01 00:00 UTC" in message, message
    assert "unix time" not in message, message


def test_a_token_expired_on_a_clock_past_2038_is_one_sentence_with_both_dates() -> None:
    ca = TestCA()
    token = ca.token("https://127.0.0.1:8443", iat=Y2038 - 86400, exp=Y2038 + 3600)
    with pytest.raises(OutpostError) as refused:
        verify_token(token, ca.cert, now=Y2038 + 7200)
    message = str(refused.value)
    assert "expired on 2038-01-19 04:14 UTC" in message and "reads 2038-01-19 05:14 UTC" in message, message
    assert verify_token(token, ca.cert, now=Y2038).exp == Y2038 + 3600


def test_a_token_file_larger_than_4_gib_is_refused_without_reading_it(tmp_path: Path) -> None:
    # Sparse: no disk space used, but its size does not fit 32 bits.
    huge = tmp_path / "outpost-enroll.token"
    with open(huge, "wb") as handle:
        handle.truncate(2**32 + 1)
    assert huge.stat().st_size == 2**32 + 1
    with pytest.raises(OutpostError, match=f"larger than {MAX_TOKEN_FILE} bytes"):
        read_token_file(huge)


def _protocol_structs() -> list[tuple[str, struct.Struct]]:
    found = []
    for module_info in pkgutil.iter_modules(protocol_package.__path__):
        module = importlib.import_module(f"{protocol_package.__name__}.{module_info.name}")
        found += [(f"{module_info.name}.{name}", value) for name, value in vars(module).items()
                  if isinstance(value, struct.Struct)]
    return found


def test_every_wire_integer_has_a_fixed_size_on_every_word_size() -> None:
    structs = _protocol_structs()
    assert structs, "the protocol core packs no integers with struct any more: update this test"
    # Native sizes ('@' or none) make 'l' 4 bytes on armhf and 8 on arm64.
    native = [name for name, packer in structs if packer.format[:1] not in ("<", ">", "!", "=")]
    assert native == [], f"wire formats with native sizes: {native}"


def test_wire_integers_at_their_limits_round_trip() -> None:
    frame = encode_frame(FrameType.WINDOW, 0, 2**32 - 1, struct.pack(">I", MAX_WINDOW))
    frame_type, flags, stream_id, length = struct.unpack_from(">BBII", frame)
    assert (frame_type, stream_id, length) == (FrameType.WINDOW, 2**32 - 1, 4)
    assert struct.unpack_from(">I", frame, 10)[0] == MAX_WINDOW
    assert PING_COUNTER.unpack(PING_COUNTER.pack(2**64 - 1)) == (2**64 - 1,)
    # A window past 31 bits must be refused by the sender, never wrap.
    with pytest.raises(struct.error):
        struct.pack(">I", 2**32)


def test_one_tunnel_with_every_stream_open_fits_a_32_bit_gateway() -> None:
    relay = Connection(Role.RELAY, 0.0, limits=ProtocolLimits())
    agent = Connection(Role.AGENT, 0.0, limits=ProtocolLimits())
    relay.send_challenge(bytes(32))
    agent.receive_data(relay.data_to_send(), 0.0)
    agent.send_auth(["-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"], b"sig")
    relay.receive_data(agent.data_to_send(), 0.0)
    relay.accept_auth({"identity": "spiffe://outpost.test/default/gw", "name": "gw", "time": Y2038})
    agent.receive_data(relay.data_to_send(), 0.0)
    assert agent.authenticated
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(MAX_STREAMS):
            agent.open_stream("modbus")
        relay.receive_data(agent.data_to_send(), 0.0)
        per_stream = (tracemalloc.get_traced_memory()[0] - before) / MAX_STREAMS
    finally:
        tracemalloc.stop()
    assert len(relay.open_stream_ids) == MAX_STREAMS
    assert per_stream <= IDLE_STREAM_CEILING, f"an idle stream costs {per_stream:.0f} bytes"
    worst_case = RECEIVE_BUDGET + MAX_FRAME_PAYLOAD + MAX_STREAMS * IDLE_STREAM_CEILING
    assert worst_case <= TUNNEL_MEMORY_CEILING, f"one tunnel may hold {worst_case} bytes"
