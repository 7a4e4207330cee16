"""Authentication and binds: CHALLENGE, AUTH, AUTH_OK, BIND and BIND_RESULT, sent and received.

The relay and the agent walk different halves of ``Handshake``, each a
transition table keyed ``(state, input)`` like a stream's (``TRANSITIONS``);
checking the chain and the signature is the caller's business
(``auth_message`` is what the agent's key signs), this part only keeps the
order.
"""

from __future__ import annotations

import base64
from typing import Any

from shared.protocol.control import (
    AUTH_RESERVED_KEYS,
    decode_auth,
    decode_auth_ok,
    decode_bind,
    decode_bind_result,
)
from shared.protocol.endpoint import Endpoint, require
from shared.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol.events import (
    Authenticated,
    AuthReceived,
    BindCompleted,
    BindRequested,
    ChallengeReceived,
    Event,
)
from shared.protocol.frames import FrameType, encode_json
from shared.protocol.limits import MAX_BIND_SERVICES, MAX_SERVICE_NAME_CHARS, NONCE_SIZE, PROTOCOL_VERSION
from shared.protocol.state import Handshake, Role
from shared.protocol.transitions import MachineInput, TransitionTable

AUTH_MESSAGE_PREFIX = b"outpost-tunnel-auth-v1\0"
# What BIND_RESULT says of a refused name when the full reasons would not fit
# in one control frame; the relay's audit log keeps every full reason.
SHORT_REFUSAL = "refused; the relay's audit log says why"


def bind_problem(services: tuple[str, ...] | list[str]) -> str | None:
    """Why ``services`` cannot be one BIND (too many, or a name too long), or None."""
    if len(services) > MAX_BIND_SERVICES:
        return (f"BIND names {len(services)} services; one BIND may name at most {MAX_BIND_SERVICES}: "
                "bind fewer services per tunnel")
    longest = max((len(s) for s in services), default=0)
    if longest > MAX_SERVICE_NAME_CHARS:
        return (f"BIND names a service of {longest} characters; a service name has at most "
                f"{MAX_SERVICE_NAME_CHARS} (tenant/name)")
    return None


def auth_message(nonce: bytes, relay_cert_sha256: bytes) -> bytes:
    """What the agent's device key signs: it binds the nonce to the relay's certificate."""
    return AUTH_MESSAGE_PREFIX + bytes(nonce) + bytes(relay_cert_sha256)


class HandshakeInput(MachineInput):
    SEND_CHALLENGE = "send CHALLENGE"
    RECV_CHALLENGE = "receive CHALLENGE"
    SEND_AUTH = "send AUTH"
    RECV_AUTH = "receive AUTH"
    SEND_AUTH_OK = "send AUTH_OK"
    RECV_AUTH_OK = "receive AUTH_OK"
    SEND_BIND = "send BIND"
    RECV_BIND = "receive BIND"
    SEND_BIND_RESULT = "send BIND_RESULT"
    RECV_BIND_RESULT = "receive BIND_RESULT"


H = Handshake
I = HandshakeInput  # noqa: E741 - the tables read as tables with short names

#: Each end's half of the handshake: the relay challenges and admits, the agent answers and binds.
TRANSITIONS: dict[Role, dict[tuple[Handshake, HandshakeInput], Handshake]] = {
    Role.RELAY: {
        (H.START, I.SEND_CHALLENGE): H.CHALLENGED,
        (H.CHALLENGED, I.RECV_AUTH): H.AUTH_EXCHANGED,
        (H.AUTH_EXCHANGED, I.SEND_AUTH_OK): H.DONE,
        (H.DONE, I.RECV_BIND): H.DONE,
        (H.DONE, I.SEND_BIND_RESULT): H.DONE,
    },
    Role.AGENT: {
        (H.START, I.RECV_CHALLENGE): H.CHALLENGED,
        (H.CHALLENGED, I.SEND_AUTH): H.AUTH_EXCHANGED,
        (H.AUTH_EXCHANGED, I.RECV_AUTH_OK): H.DONE,
        (H.DONE, I.SEND_BIND): H.DONE,
        (H.DONE, I.RECV_BIND_RESULT): H.DONE,
    },
}

del H, I

#: The one way the handshake takes a transition; a peer's input out of order ends the tunnel.
HANDSHAKE_TABLES: dict[Role, TransitionTable[Handshake, HandshakeInput]] = {
    role: TransitionTable(rows, local_code=ErrorCode.PROTOCOL_ERROR,
                          remote_code=lambda _input: ErrorCode.PROTOCOL_ERROR)
    for role, rows in TRANSITIONS.items()
}


class AuthExchange:
    """Where this end's authentication stands, what the peer said of itself, and BINDs not yet answered."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._table = HANDSHAKE_TABLES[endpoint.role]
        self._subject = f"the {endpoint.role.value}'s handshake"
        self.state = Handshake.START
        #: the peer's AUTH (relay side, minus chain and signature) or AUTH_OK (agent side)
        self.peer_info: dict[str, Any] | None = None
        self.binds_pending = 0

    def _take(self, event: HandshakeInput) -> Handshake:
        """The state ``event`` leads to; raises the refusal (local misuse or the peer's violation) otherwise."""
        return self._table.take(self.state, event, self._subject)

    def _enter(self, state: Handshake) -> None:
        self.state = state
        if state is Handshake.DONE:
            self._endpoint.authenticated = True

    # -- sent --------------------------------------------------------------
    def send_challenge(self, nonce: bytes) -> None:
        endpoint = self._endpoint
        endpoint.require_open()
        new_state = self._take(HandshakeInput.SEND_CHALLENGE)
        require(len(nonce) == NONCE_SIZE, f"the nonce must be {NONCE_SIZE} bytes")
        endpoint.queue_frame(FrameType.CHALLENGE, 0, 0, bytes([PROTOCOL_VERSION]) + bytes(nonce))
        self._enter(new_state)

    def send_auth(self, chain_pem: list[str], signature: bytes, extra: dict[str, Any] | None) -> None:
        endpoint = self._endpoint
        endpoint.require_open()
        new_state = self._take(HandshakeInput.SEND_AUTH)
        require(bool(chain_pem) and all(isinstance(p, str) for p in chain_pem),
                "the certificate chain must be a non-empty list of PEM strings")
        extra = dict(extra or {})
        clash = AUTH_RESERVED_KEYS & set(extra)
        require(not clash, f"AUTH fields {sorted(clash)} are set by the protocol itself")
        body = {
            "version": PROTOCOL_VERSION,
            "chain": list(chain_pem),
            "signature": base64.b64encode(bytes(signature)).decode("ascii"),
            "window": endpoint.limits.initial_window,
            **extra,
        }
        endpoint.queue_frame(FrameType.AUTH, 0, 0, endpoint.control_payload("AUTH", body))
        self._enter(new_state)

    def accept_auth(self, info: dict[str, Any]) -> None:
        endpoint = self._endpoint
        endpoint.require_open()
        new_state = self._take(HandshakeInput.SEND_AUTH_OK)
        body = {**info, "window": endpoint.limits.initial_window}
        endpoint.queue_frame(FrameType.AUTH_OK, 0, 0, endpoint.control_payload("AUTH_OK", body))
        self._enter(new_state)

    def send_bind(self, services: list[str]) -> None:
        endpoint = self._endpoint
        endpoint.require_ready()
        self._take(HandshakeInput.SEND_BIND)
        require(all(isinstance(s, str) and s for s in services), "service names must be non-empty strings")
        problem = bind_problem(services)
        require(problem is None, problem or "")
        endpoint.queue_frame(FrameType.BIND, 0, 0, endpoint.control_payload("BIND", {"services": list(services)}))
        self.binds_pending += 1

    def send_bind_result(self, bound: list[str], refused: dict[str, str]) -> None:
        endpoint = self._endpoint
        endpoint.require_ready()
        self._take(HandshakeInput.SEND_BIND_RESULT)
        require(self.binds_pending > 0, "BIND_RESULT answers a BIND; none is pending")
        endpoint.queue_frame(FrameType.BIND_RESULT, 0, 0, self._bind_result_payload(bound, refused))
        self.binds_pending -= 1

    def _bind_result_payload(self, bound: list[str], refused: dict[str, str]) -> bytes:
        """BIND_RESULT within the control frame limit: full reasons where they fit, short ones otherwise.

        Names are bounded by the BIND limits, so the short form of an answer to
        any valid BIND always fits (tests/controller/relay/test_relay_load.py).
        """
        body = {"bound": list(bound), "refused": dict(refused)}
        try:
            payload = encode_json(body)
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(ErrorCode.INTERNAL_ERROR, f"BIND_RESULT payload is not JSON: {exc}") from None
        if len(payload) > self._endpoint.limits.max_control_payload:
            body["refused"] = {name: SHORT_REFUSAL for name in refused}
        return self._endpoint.control_payload("BIND_RESULT", body)

    # -- received (frame handlers: flags, stream id, payload, events) -----------
    def on_challenge(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        new_state = self._take(HandshakeInput.RECV_CHALLENGE)
        if not payload:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR, "empty CHALLENGE")
        version, nonce = payload[0], payload[1:]
        if version == PROTOCOL_VERSION and len(nonce) != NONCE_SIZE:
            raise RemoteProtocolError(ErrorCode.FRAME_SIZE_ERROR,
                                      f"CHALLENGE nonce of {len(nonce)} bytes, not {NONCE_SIZE}")
        self._enter(new_state)
        events.append(ChallengeReceived(version, nonce))

    def on_auth(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        new_state = self._take(HandshakeInput.RECV_AUTH)
        chain, signature, info, window = decode_auth(payload)
        self._endpoint.peer_window = window
        self.peer_info = info
        self._enter(new_state)
        events.append(AuthReceived(chain, signature, info))

    def on_auth_ok(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        new_state = self._take(HandshakeInput.RECV_AUTH_OK)
        info, window = decode_auth_ok(payload)
        self._endpoint.peer_window = window
        self.peer_info = info
        self._enter(new_state)
        events.append(Authenticated(info))

    def on_bind(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        self._take(HandshakeInput.RECV_BIND)
        services = decode_bind(payload)
        problem = bind_problem(services)
        if problem is not None:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, problem)
        self.binds_pending += 1
        events.append(BindRequested(services))

    def on_bind_result(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        self._take(HandshakeInput.RECV_BIND_RESULT)
        if self.binds_pending == 0:
            raise RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected BIND_RESULT: no BIND is pending")
        bound, refused = decode_bind_result(payload)
        self.binds_pending -= 1
        events.append(BindCompleted(bound, refused))
