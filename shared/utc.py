"""Unix times as UTC dates, computed by arithmetic.

Python's ``datetime.fromtimestamp`` and ``time.gmtime`` go through the C
library's ``time_t``, which is 32 bits on Debian armhf and ends on
2038-01-19: a token or certificate date past it crashed there with
``OverflowError``. Adding seconds to the epoch has no such end.
"""

from __future__ import annotations

import datetime

UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
#: How dates read in sentences, status lines and tables.
DATE_PATTERN = "%Y-%m-%d %H:%M UTC"


def utc_datetime(timestamp: float) -> datetime.datetime:
    """The aware UTC datetime of a unix time; OverflowError or ValueError outside datetime's years."""
    return UNIX_EPOCH + datetime.timedelta(seconds=timestamp)


def format_utc(timestamp: float, pattern: str = DATE_PATTERN) -> str:
    """``YYYY-MM-DD HH:MM UTC`` (or ``pattern``) for any unix time a clock can read; ``unix time N`` past year 9999."""
    try:
        moment = utc_datetime(timestamp)
    except (OverflowError, ValueError):
        return f"unix time {timestamp:.0f}"
    return moment.strftime(pattern)
