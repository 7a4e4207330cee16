"""When a policy ends: ``until`` (a time) or ``for`` (a duration from now), checked before anything is written."""

from __future__ import annotations

import datetime as dt
import re

from controller.errors import bad_request

#: The longest a policy may be given to run for or until: ten years, past which
#: an expiry means nothing (the CA and every certificate end sooner), and a
#: typo of many zeros is caught instead of overflowing the calendar.
MAX_POLICY_LIFETIME_SECONDS = 10 * 365 * 86400
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: The last second ISO 8601 (and Python's calendar) can write: 9999-12-31T23:59:59Z.
LATEST_TIME = 253402300799
_DURATION = re.compile(r"^\s*(\d{1,12})\s*([smhdw]?)\s*$")


def parse_duration(text: object) -> float:
    """``90s``, ``30m``, ``8h``, ``7d``, ``2w`` (a bare number is seconds) as seconds; 400 otherwise."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise bad_request("invalid_duration", f"{str(text)[:40]!r} is not a duration; write a number and a unit "
                          "(s, m, h, d, w), such as 30m, 8h or 7d.")
    seconds = float(int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"])
    if seconds > MAX_POLICY_LIFETIME_SECONDS:
        raise bad_request("invalid_duration", f"{text!r} is longer than ten years; give a shorter duration.")
    return seconds


def parse_time(text: object) -> float:
    """An ISO 8601 time (``2026-12-31T18:00:00Z``; without an offset, UTC) as seconds since the epoch; 400 otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not 0 <= text <= LATEST_TIME:  # also NaN: no comparison holds
            raise bad_request("invalid_time", f"{text!r} is not a time; give seconds since 1970 or ISO 8601.")
        return float(text)
    try:
        if not isinstance(text, str):
            raise ValueError
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise bad_request("invalid_time", f"{str(text)[:40]!r} is not a time; write it as ISO 8601, such as "
                          "2026-12-31T18:00:00Z.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def expiry(until: object, lifetime: object, now: float) -> float | None:
    """The expiry ``until``/``for`` name (at most one of them), or None for neither; 400 for a bad or past one."""
    if until is not None and lifetime is not None:
        raise bad_request("invalid_expiry", "Give either an end time (until) or a duration (for), not both.")
    if lifetime is not None:
        return now + parse_duration(lifetime)
    if until is None:
        return None
    moment = parse_time(until)
    if moment <= now:
        raise bad_request("invalid_time", f"{format_time(moment)} is in the past; give a time to come, or a "
                          "duration (for).")
    if moment - now > MAX_POLICY_LIFETIME_SECONDS:
        raise bad_request("invalid_time", f"{format_time(moment)} is more than ten years away; give a nearer time.")
    return moment


def format_time(moment: float) -> str:
    """``2026-12-31T18:00:00Z``: how expiries appear in sentences."""
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
