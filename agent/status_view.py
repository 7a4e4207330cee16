"""What ``outpost-agent status`` shows: the stored identity and ``status.json`` as plain data (``--json``)
and as aligned lines for people, every time in UTC with how far it is from the agent's trusted now."""

from __future__ import annotations

from typing import Any

from agent.identity.state import EnrolledIdentity
from agent.tunnel.status import clock_time
from shared.utc import format_utc


def status_report(identity: EnrolledIdentity, live: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """What ``status`` shows, as plain data (the ``--json`` output)."""
    not_after = identity.not_after()
    offset = live.get("clock_offset_s") if isinstance(live, dict) else None
    if isinstance(offset, (int, float)) and not isinstance(offset, bool):
        now += offset  # the agent's trusted time, not this clock alone
    return {
        "now": now,
        "identity": identity.uri,
        "name": identity.name,
        "tenant": identity.tenant,
        "controller": identity.controller_url,
        "relays": list(identity.relays),
        "key_backend": identity.key_backend,
        "enrolled_at": identity.enrolled_at,
        "cert_not_after": not_after.timestamp(),
        "cert_expired": not_after.timestamp() <= now,
        "clock": _clock_sentence(live, now - (offset if isinstance(offset, (int, float)) else 0.0)),
        "tunnel": live,
    }


def _clock_sentence(live: dict[str, Any] | None, local_now: float) -> str | None:
    """The plain sentence about the agent's clock from status.json, or None before it measured."""
    from agent.clock.trusted import describe_offset

    if not isinstance(live, dict) or not isinstance(live.get("clock_source"), str):
        return None
    offset = live.get("clock_offset_s")
    sentence = describe_offset(offset if isinstance(offset, (int, float)) else 0.0, local_now, live["clock_source"])
    problem = live.get("clock_problem")
    return f"{sentence}; {problem}" if isinstance(problem, str) and problem else sentence


def format_status(report: dict[str, Any]) -> str:
    """The human-readable ``status`` text; times in UTC, with how far they are from trusted now."""
    now = report["now"]
    expiry = _when(report["cert_not_after"], now)
    lines = [
        f"identity:    {report['identity']}",
        f"tenant:      {report['tenant']}",
        f"controller:  {report['controller']}",
        f"key:         {report['key_backend']}",
        f"certificate: valid until {expiry}" + (" (EXPIRED)" if report["cert_expired"] else ""),
    ]
    live = report["tunnel"]
    if isinstance(live, dict):
        lines.extend(_renewal_lines(live, now))
    if report.get("clock"):
        lines.append(f"clock:       {report['clock']}")
    if live is None:
        lines.append("tunnel:      no status yet (is outpost-agent run active?)")
        return "\n".join(lines)
    lines.extend(_tunnel_lines(live, now))
    return "\n".join(lines)


def _renewal_lines(live: dict[str, Any], now: float) -> list[str]:
    lines = []
    if _is_number(live.get("next_renewal")):
        lines.append(f"next renewal: {_when(live['next_renewal'], now)}")
    if isinstance(live.get("renewal_error"), str) and live["renewal_error"]:
        lines.append(f"renewal:     the last attempt failed: {live['renewal_error']}")
    return lines


# Keys of status.json (written by agent.tunnel.supervisor) shown with their own wording.
_STATUS_SHOWN = {"state", "relay", "connected_since", "down_since", "rtt_ms", "bytes_in", "bytes_out", "updated",
                 "clock_offset_s", "clock_source", "clock_problem", "cert_not_after", "next_renewal",
                 "renewal_error", "next_ask", "transport", "aiohttp_loaded",
                 "openssl_backend_loaded"}
#: How the text names what the tunnel runs on (status.json's ``transport``).
_TRANSPORT_WORDS = {"tls": "TLS, ALPN outpost/1", "websocket": "WebSocket"}


def _tunnel_lines(live: dict[str, Any], now: float) -> list[str]:
    state = live.get("state", "unknown")
    if state == "disabled" and _is_number(live.get("next_ask")):
        ask = live["next_ask"]
        lines = [f"tunnel:      disabled by central ops; asking again at {clock_time(ask)} ({_relative(ask - now)})"]
    else:
        lines = [f"tunnel:      {state}"]
    if live.get("relay"):
        over = _TRANSPORT_WORDS.get(live.get("transport")) if state == "connected" else None  # type: ignore[arg-type]
        lines.append(f"relay:       {live['relay']}" + (f" ({over})" if over else ""))
    # Only a tunnel that is up has been connected since some time; an agent from before
    # down_since left connected_since of a tunnel that was gone, which must not be shown as current.
    if state == "connected" and _is_number(live.get("connected_since")):
        lines.append(f"connected:   since {_when(live['connected_since'], now)}")
    elif state != "connected" and _is_number(live.get("down_since")):
        lines.append(f"down:        since {_when(live['down_since'], now)}")
    if isinstance(live.get("rtt_ms"), (int, float)):
        lines.append(f"rtt:         {live['rtt_ms']:.0f} ms")
    if "bytes_in" in live or "bytes_out" in live:
        lines.append(f"bytes:       in {live.get('bytes_in', 0)}, out {live.get('bytes_out', 0)}")
    for key in sorted(set(live) - _STATUS_SHOWN):
        value = live[key]
        if value in (None, [], {}):
            continue
        lines.append(f"{key.replace('_', ' ') + ':':<12} {_plain(value)}")
    if _is_number(live.get("updated")):
        lines.append(f"updated:     {_when(live['updated'], now)}")
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _when(timestamp: float, now: float) -> str:
    """``2026-11-22 14:05 UTC (in 5 h 12 min)`` or ``(3 min ago)``, relative to trusted ``now``."""
    return f"{format_utc(timestamp)} ({_relative(timestamp - now)})"


def _relative(seconds: float) -> str:
    # Truncated, not rounded: a certificate with 23 h 59.9 min left does not yet have "1 d".
    span = int(abs(seconds))
    if span < 60:
        text = f"{span} s"
    elif span < 3600:
        text = f"{span // 60} min"
    elif span < 86400:
        text = f"{span // 3600} h {span % 3600 // 60} min"
    else:
        text = f"{span // 86400} d {span % 86400 // 3600} h"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)
