"""RELAY_CERT: a relay presents its renewed certificate on a tunnel that is already up.

The agent checks a relay's certificate at the TLS handshake and leaves the
tunnel before that certificate ends (agent/tunnel/relay_trust.py). A relay
that renewed says so in-band instead of cutting its tunnels: the new
certificate (DER) and its key's signature over ``relay_cert_message``, which
binds it to this tunnel's CHALLENGE nonce, so a push recorded on one tunnel is
worthless on any other. The core only carries the frame; judging the
certificate is the agent's glue. A push the agent cannot read is refused alone
(``RelayCertificateOffered`` with ``refused``): the tunnel carries on to the
old certificate's end.
"""

from __future__ import annotations

import base64
import binascii

from shared.protocol.control import decode_object
from shared.protocol.endpoint import Endpoint, require
from shared.protocol.errors import ErrorCode, RemoteProtocolError
from shared.protocol.events import Event, RelayCertificateOffered
from shared.protocol.frames import FrameType
from shared.protocol.state import Role

#: What the relay's key signs: this prefix, the tunnel's CHALLENGE nonce, the new certificate's SHA-256.
RELAY_CERT_MESSAGE_PREFIX = b"outpost-relay-cert-v1\0"
#: Bytes of one RELAY_CERT payload. A relay certificate is under 1 KiB of DER (1.4 KiB in base64 with the
#: signature); 8 KiB leaves room for long lists of names, and a push never costs an agent more.
MAX_RELAY_CERT_BYTES = 8 * 1024
#: The key in AUTH by which an agent says it understands RELAY_CERT: an older agent would take the
#: unknown frame type for a protocol error, so a relay sends it only to an agent that said so.
RELAY_CERT_FEATURE = "relay_cert"


def relay_cert_message(nonce: bytes, certificate_sha256: bytes) -> bytes:
    """What the renewed certificate's key signs on the tunnel whose CHALLENGE carried ``nonce``."""
    return RELAY_CERT_MESSAGE_PREFIX + bytes(nonce) + bytes(certificate_sha256)


def _b64(obj: dict[str, object], key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f'malformed RELAY_CERT payload: "{key}" must be base64')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR,
                                  f'malformed RELAY_CERT payload: "{key}" is not valid base64') from None


class RelayCertificates:
    """The RELAY_CERT frames of one tunnel end."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        #: RELAY_CERT frames sent (relay) or received (agent), refused ones included
        self.count = 0

    def send(self, certificate_der: bytes, signature: bytes) -> int:
        """Relay: queue RELAY_CERT; returns its payload size."""
        endpoint = self._endpoint
        require(endpoint.role is Role.RELAY, "only the relay sends RELAY_CERT")
        endpoint.require_ready()
        payload = endpoint.control_payload("RELAY_CERT", {
            "certificate": base64.b64encode(certificate_der).decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
        })
        require(len(payload) <= MAX_RELAY_CERT_BYTES,
                f"RELAY_CERT payload of {len(payload)} bytes exceeds {MAX_RELAY_CERT_BYTES}")
        endpoint.queue_frame(FrameType.RELAY_CERT, 0, 0, payload)
        self.count += 1
        return len(payload)

    def on_relay_cert(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._endpoint.role is not Role.AGENT:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected RELAY_CERT (only a relay sends one)")
        self.count += 1
        try:
            if len(payload) > MAX_RELAY_CERT_BYTES:
                raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"malformed RELAY_CERT payload: {len(payload)} "
                                          f"bytes, more than {MAX_RELAY_CERT_BYTES}")
            obj = decode_object("RELAY_CERT", payload)
            certificate, signature = _b64(obj, "certificate"), _b64(obj, "signature")
        except RemoteProtocolError as exc:
            events.append(RelayCertificateOffered(b"", b"", str(exc)))
            return
        events.append(RelayCertificateOffered(certificate, signature, None))
