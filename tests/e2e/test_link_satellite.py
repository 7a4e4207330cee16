"""One stream over a GEO satellite path gets at least 90% of what direct TCP gets over the same path.

A functional requirement, measured as a ratio against direct TCP in the same
run (tests/bench/satellite.py, on small sizes): real processes, the GEO
profile of the link emulator (600 ms round trip, 20 Mbit/s), the agent's
"satellite" link profile, both directions.
"""

from __future__ import annotations

import pytest

from tests.bench.satellite import measure

pytestmark = pytest.mark.slow

# 10 MB per transfer: 4 s at 20 Mbit/s each, so the 600 ms of a stream's
# opening round trip and the last byte's flight are a fair part of the time,
# as on a real transfer of that size. Four transfers take about half a minute.
TRANSFER = 10_000_000
GOAL = 0.9


def test_a_single_stream_over_geo_reaches_ninety_percent_of_direct_tcp_both_ways() -> None:
    report = measure(TRANSFER, rounds=1)
    assert report["agent_link_profile"] == "satellite"
    assert report["reconnects_during_run"] == 0, report
    assert report["tunnel_vs_direct_to_gateway"] >= GOAL, report["mbit_s"]
    assert report["tunnel_vs_direct_from_gateway"] >= GOAL, report["mbit_s"]
