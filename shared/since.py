"""``--since`` / ``?since=``: a duration ago, an ISO 8601 time or a unix time, read the same by both ends.

``outpostctl`` checks the value before it sends it (a usage error, no
request) and the controller reads it into a unix time; one reader means a
value the command accepts is never one the controller refuses.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time

from shared.errors import OutpostError

#: A time may be this far ahead of the reader's clock (the operator's clock
#: drifts a little from the controller's); further is a mistake, not skew.
MAX_FUTURE_SKEW_SECONDS = 60.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Nine digits: a billion weeks is past any trail, and the product stays an exact float.
_DURATION = re.compile(r"(\d{1,9})([smhdw])")
#: How much of a bad value an error quotes back.
_QUOTED_CHARS = 40


class InvalidSince(OutpostError):
    """A time that does not parse or lies in the future; ``code`` is the API's error code for it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_since(text: str, now: float | None = None) -> float:
    """A unix time from a duration ago (``90s``, ``15m``, ``2h``, ``7d``, ``1w``), an ISO 8601 time or a unix time."""
    now = time.time() if now is None else now
    text = text.strip()
    if match := _DURATION.fullmatch(text):
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        when = float(text)
        if not math.isfinite(when):
            raise ValueError(text)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidSince("invalid_since", f"{text[:_QUOTED_CHARS]!r} is not a time: give a duration ago "
                               "(15m, 2h, 7d), an ISO 8601 time (2026-12-06T10:00:00Z) or a unix time.") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)  # the controller's times are UTC
        when = parsed.timestamp()
    if when > now + MAX_FUTURE_SKEW_SECONDS:
        raise InvalidSince("since_in_future", f"{text[:_QUOTED_CHARS]!r} is in the future: give a time in the past.")
    return when
