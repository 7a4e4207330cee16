"""Human output: aligned tables, key/value blocks and readable times."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.utc import format_utc, utc_datetime

#: Shown for a value the controller left empty (never enrolled, no expiry...).
MISSING = "-"
#: Space between table columns: enough to read, little enough for 80 columns.
COLUMN_GAP = "  "


def format_time(value: Any) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM:SS UTC``; strings pass through, None is ``-``."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return format_utc(value, "%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def format_audit_time(value: Any) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM:SSZ`` (UTC): the audit view's time column."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _utc(value).strftime("%Y-%m-%d %H:%M:%SZ")
    return format_value(value)


def _utc(value: float) -> datetime.datetime:
    return utc_datetime(value)


def format_time_compact(value: Any) -> str:
    """A unix time as ``YYYY-MM-DDTHH:MM:SSZ``: one word, for ``key=value`` lists."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_utc(value, "%Y-%m-%dT%H:%M:%SZ")
    return format_value(value)


def format_value(value: Any) -> str:
    """A JSON value as table text: lists comma-joined, objects compact, None as ``-``."""
    if value is None or value == "" or value == []:
        return MISSING
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    materialised = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in materialised) for i in range(len(headers))]
    lines = []
    for row in materialised:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append(COLUMN_GAP.join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines with the values aligned."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{(key + ':').ljust(width + 1)} {value}" for key, value in pairs)


def machine_json(document: Mapping[str, Any] | Sequence[Any]) -> str:
    """Stable, indented JSON for scripts."""
    return json.dumps(document, indent=2, sort_keys=True)
