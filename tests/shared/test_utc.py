"""Dates shown to people have one formatter, shared/utc.py: no module of the agent or of shared formats its own."""

from __future__ import annotations

import re
from pathlib import Path

from shared.utc import format_utc

ROOT = Path(__file__).resolve().parents[2]
#: A date formatted by hand: strftime, or a conversion to local time that C's 32-bit time_t may end.
OWN_FORMATTER = re.compile(r"\.strftime\(|\.astimezone\(|time\.gmtime\(|time\.strftime\(|fromtimestamp\(")


def test_only_shared_utc_formats_dates_in_the_agent_and_shared() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for package in ("agent", "shared")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "shared" / "utc.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OWN_FORMATTER.search(line)
    ]
    assert not found, "format dates with shared.utc.format_utc:\n" + "\n".join(found)


def test_a_date_past_2038_and_past_year_9999_still_reads() -> None:
    assert format_utc(2**31) == "2038-01-19 03:14 UTC"
    assert format_utc(1e12) == "unix time 1000000000000"
