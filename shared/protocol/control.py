"""Decoding and checking the JSON control payloads (AUTH, AUTH_OK, OPEN, BIND, BIND_RESULT, REPORT).

Every check raises RemoteProtocolError: these payloads only ever come from
the peer. Types are checked exactly (a JSON ``true`` is not a window size).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, TypeGuard

from shared.protocol.errors import ErrorCode, RemoteProtocolError
from shared.protocol.limits import INITIAL_WINDOW, MAX_WINDOW, PROTOCOL_VERSION

# Keys of AUTH the connection itself fills in; ``extra`` may not override them.
AUTH_RESERVED_KEYS = frozenset({"version", "chain", "signature", "window"})


def _bad(frame: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, f"malformed {frame} payload: {why}")


def decode_object(frame: str, payload: bytes) -> dict[str, Any]:
    """The JSON object in ``payload``."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 and bad JSON; RecursionError deep nesting.
        raise _bad(frame, f"not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise _bad(frame, "not a JSON object")
    return obj


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_list(frame: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(frame, f'"{key}" must be a list of strings')
    return tuple(value)


def peer_window(frame: str, obj: dict[str, Any]) -> int:
    """The peer's advertised per-stream receive window (our send window)."""
    window = obj.get("window", INITIAL_WINDOW)
    if not _is_int(window) or not 1 <= window <= MAX_WINDOW:
        raise _bad(frame, f'"window" must be an integer from 1 to {MAX_WINDOW}')
    return window


def decode_auth(payload: bytes) -> tuple[tuple[str, ...], bytes, dict[str, Any], int]:
    """(chain, signature, info, window) from AUTH."""
    obj = decode_object("AUTH", payload)
    version = obj.get("version")
    if not _is_int(version):
        raise _bad("AUTH", '"version" must be an integer')
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"the agent speaks tunnel protocol version {version}; this relay speaks {PROTOCOL_VERSION}",
        )
    chain = _string_list("AUTH", "chain", obj.get("chain"))
    if not chain:
        raise _bad("AUTH", '"chain" is empty')
    signature_text = obj.get("signature")
    if not isinstance(signature_text, str):
        raise _bad("AUTH", '"signature" must be a base64 string')
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("AUTH", '"signature" is not valid base64') from None
    window = peer_window("AUTH", obj)
    info = {k: v for k, v in obj.items() if k not in ("chain", "signature")}
    return chain, signature, info, window


def decode_auth_ok(payload: bytes) -> tuple[dict[str, Any], int]:
    """(info, window) from AUTH_OK."""
    obj = decode_object("AUTH_OK", payload)
    return obj, peer_window("AUTH_OK", obj)


def decode_open(payload: bytes, *, peer_allowed: bool) -> tuple[str, str | None]:
    """(service, peer) from OPEN. Only the relay may name the dialing peer."""
    obj = decode_object("OPEN", payload)
    service = obj.get("service")
    if not isinstance(service, str) or not service:
        raise _bad("OPEN", '"service" must be a non-empty string')
    peer = obj.get("peer")
    if peer is not None:
        if not peer_allowed:
            # The relay decides identities from its own authentication only.
            raise _bad("OPEN", "only the relay may name the dialing peer")
        if not isinstance(peer, str):
            raise _bad("OPEN", '"peer" must be a string')
    return service, peer


def decode_bind(payload: bytes) -> tuple[str, ...]:
    obj = decode_object("BIND", payload)
    return _string_list("BIND", "services", obj.get("services"))


def decode_bind_result(payload: bytes) -> tuple[tuple[str, ...], dict[str, str]]:
    obj = decode_object("BIND_RESULT", payload)
    bound = _string_list("BIND_RESULT", "bound", obj.get("bound", []))
    refused = obj.get("refused", {})
    if not isinstance(refused, dict) or not all(isinstance(v, str) for v in refused.values()):
        raise _bad("BIND_RESULT", '"refused" must map service names to reasons')
    return bound, refused


# -- REPORT: what the agent says of itself ------------------------------------------
# Bytes of one REPORT payload. A full report is about 500 bytes (a dozen short
# fields); four times that leaves room for long OS names and an error
# sentence, while the relay keeps one report per tunnel (10,000 tunnels hold
# 20 MB at most) and each report a metered gateway sends stays a small part
# of its 100 KB/day budget. Larger (up to the control frame limit) is refused
# alone; the tunnel carries on.
MAX_REPORT_BYTES = 2048
# Characters of the error sentence a report carries: one sentence for a log
# line, cut by the agent to fit.
MAX_REPORT_ERROR_CHARS = 300
# Characters of any other text field (a version, an OS name, a profile).
MAX_REPORT_TEXT_CHARS = 64
# The report's fields and what each may hold: text, a number, or a positive number.
REPORT_TEXT_FIELDS = frozenset({"identity", "agent_version", "os", "arch", "link_profile", "clock_source",
                                "key_backend"})
REPORT_NUMBER_FIELDS = frozenset({"rtt_ms", "clock_offset_s", "cert_not_after", "next_renewal"})
REPORT_POSITIVE_FIELDS = frozenset({"keepalive_s"})
# Characters of ``identity``: a SPIFFE URI of a trust domain and two names.
MAX_REPORT_IDENTITY_CHARS = 400


def decode_report(payload: bytes) -> dict[str, Any]:
    """The checked fields of a REPORT; unknown keys (a newer agent's) are dropped, null means unknown.

    Raises RemoteProtocolError for a report to refuse; the caller refuses the
    report alone, never the tunnel.
    """
    if len(payload) > MAX_REPORT_BYTES:
        raise _bad("REPORT", f"{len(payload)} bytes, more than {MAX_REPORT_BYTES}")
    obj = decode_object("REPORT", payload)
    report: dict[str, Any] = {}
    for key, value in obj.items():
        if value is None:
            if key in REPORT_TEXT_FIELDS | REPORT_NUMBER_FIELDS | REPORT_POSITIVE_FIELDS | {"renewal_error"}:
                report[key] = None
            continue
        if key in REPORT_TEXT_FIELDS:
            limit = MAX_REPORT_IDENTITY_CHARS if key == "identity" else MAX_REPORT_TEXT_CHARS
            if not isinstance(value, str) or len(value) > limit or not value.isprintable():
                raise _bad("REPORT", f'"{key}" must be printable text of at most {limit} characters')
        elif key == "renewal_error":
            if not isinstance(value, str) or len(value) > MAX_REPORT_ERROR_CHARS:
                raise _bad("REPORT", f'"renewal_error" must be text of at most {MAX_REPORT_ERROR_CHARS} characters')
        elif key in REPORT_NUMBER_FIELDS or key in REPORT_POSITIVE_FIELDS:
            if not _is_number(value) or (key in REPORT_POSITIVE_FIELDS and not value > 0):
                raise _bad("REPORT", f'"{key}" must be a {"positive " if key in REPORT_POSITIVE_FIELDS else ""}number')
        else:
            continue
        report[key] = value
    return report


def _is_number(value: Any) -> bool:
    # json.loads reads NaN and Infinity; neither is a time or a round trip.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
