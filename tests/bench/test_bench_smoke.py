"""Each benchmark script runs end to end on tiny sizes and prints its JSON result.

No performance is asserted: this keeps the scripts from rotting. The OpenSSH
baseline is checked where it can run (root, OpenSSH installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.bench_setup import ROOT, SshPath

# One script starts a controller, enrolls two agents and measures tiny sizes:
# a few seconds here; a loaded CI machine gets ten times that.
SCRIPT_TIMEOUT = 120
SSH_AVAILABLE = SshPath.unavailable() is None


def run_bench(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / f"{name}.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    found = json.loads(last)
    assert found["benchmark"] == name
    assert found["machine"]["nproc"] >= 1 and found["machine"]["python"]
    return found


def assert_positive(found: dict, *fields: str) -> None:
    for field in fields:
        assert isinstance(found[field], (int, float)) and found[field] > 0, (field, found[field])


def test_throughput_reports_all_three_paths() -> None:
    found = run_bench("throughput", "--megabytes", "2", "--rounds", "1")
    assert_positive(found, "tunnel_mbps", "direct_mbps")
    assert found["path"] == "dialer agent -> relay -> binder agent"
    if SSH_AVAILABLE:
        assert_positive(found, "ssh_mbps", "ratio_vs_ssh")
        assert found["ssh_cipher"]


def test_latency_reports_percentiles_for_each_path() -> None:
    found = run_bench("latency", "--requests", "20", "--rounds", "1")
    assert_positive(found, "tunnel_p50_us", "tunnel_p99_us", "direct_p50_us", "direct_p99_us")
    assert found["tunnel_p99_us"] >= found["tunnel_p50_us"]
    if SSH_AVAILABLE:
        assert_positive(found, "ssh_p50_us", "ssh_p99_us", "p50_ratio_vs_ssh")


def test_agent_cpu_reports_seconds_per_gb() -> None:
    found = run_bench("agent_cpu", "--megabytes", "8", "--rounds", "1")
    assert found["agent_cpu_s_per_gb"] >= 0
    assert set(found["tunnel_cpu_s_per_gb"]) == {"binder_agent", "dialer_agent", "relay"}
    if SSH_AVAILABLE:
        assert found["ssh_client_cpu_s_per_gb"] is not None


def test_footprint_reports_idle_and_busy_memory() -> None:
    found = run_bench("footprint", "--streams", "5", "--payload", "1024")
    assert_positive(found, "agent_idle_rss_mib", "agent_streams_rss_mib")
    assert found["streams_reached_service"] == 5


def test_idle_bytes_reports_a_day_of_keepalives_for_both_nat_timeouts() -> None:
    found = run_bench("idle_bytes", "--seconds", "4", "--scaled-interval", "1")
    metered = found["scaled_runs"]["metered"]
    assert metered["exchanges"] >= 2 and metered["reconnects"] == 0 and metered["blackholed"] == 0
    for case in ("metered_nat_600s", "metered_nat_150s", "baseline_ethernet_25s"):
        assert found[case]["with_tcp_ip_headers_kb_per_day"] > found[case]["payload_kb_per_day"] > 0, case
    assert isinstance(found["goal_met_nat_600s"], bool)


def test_satellite_reports_both_directions_next_to_direct_tcp() -> None:
    found = run_bench("satellite", "--megabytes", "1", "--rounds", "1")
    assert found["agent_link_profile"] == "satellite"
    assert all(value > 0 for value in found["mbit_s"].values()), found["mbit_s"]
    assert_positive(found, "tunnel_vs_direct_to_gateway", "tunnel_vs_direct_from_gateway")


@pytest.mark.skipif(not SSH_AVAILABLE, reason="the OpenSSH baseline needs root and openssh-server")
def test_the_ssh_baseline_carries_bytes(tmp_path: Path) -> None:
    from tests.bench.bench_setup import EchoServer, wait_for_path

    echo = EchoServer()
    ssh = SshPath(tmp_path, {"echo": echo.port})
    try:
        ssh.start()
        wait_for_path(ssh.ports["echo"])
        assert ssh.client_pid > 0 and ssh.sshd_session_pids()
    finally:
        ssh.stop()
        echo.close()


def test_idle_connections_reports_memory_per_connection_and_the_tunnels_round_trip() -> None:
    found = run_bench("idle_connections", "--connections", "20", "--after-close-wait", "1")
    assert found["loops"], found
    for result in found["loops"].values():
        assert result["connections"] == 20
        assert_positive(result["tunnel_round_trip"]["holding"], "p50_ms", "p99_ms")
        assert result["controller_rss_kib"]["holding"] > 0
