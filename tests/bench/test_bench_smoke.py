"""Each benchmark script runs end to end on tiny sizes and prints its JSON result.

No performance is asserted: this keeps the scripts from rotting. The OpenSSH
baseline is checked where it can run (root, OpenSSH installed), the stunnel
chain where stunnel4 is installed, and its absence must be said, not hidden.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import stunnel_path
from tests.bench.bench_setup import ROOT, SshPath

# One script starts a controller, enrolls two agents and measures tiny sizes:
# a few seconds here; a loaded CI machine gets ten times that.
SCRIPT_TIMEOUT = 120
SSH_AVAILABLE = SshPath.unavailable() is None
STUNNEL_AVAILABLE = stunnel_path.unavailable() is None
needs_stunnel = pytest.mark.skipif(not STUNNEL_AVAILABLE, reason="stunnel4 is not installed (scripts/setup)")
# The processes on each path whose CPU the benchmarks report, and their sum.
TUNNEL_PROCESSES = {"dialer_agent", "relay", "binder_agent", "path_total"}
STUNNEL_PROCESSES = {"stunnel-client", "stunnel-middle", "stunnel-server", "path_total"}


def run_bench(name: str, *args: str, env: dict | None = None, stderr: list[str] | None = None) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / f"{name}.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    found = json.loads(last)
    assert found["benchmark"] == name
    assert found["machine"]["nproc"] >= 1 and found["machine"]["python"]
    if stderr is not None:
        stderr.append(result.stderr)
    return found


def assert_stunnel_said(found: dict, stderr: str) -> None:
    """Measured where stunnel4 is installed; otherwise said in the JSON and in one stderr line."""
    if STUNNEL_AVAILABLE:
        assert found["stunnel_available"] is True and found["stunnel_skipped"] is None
        assert found["stunnel_version"].startswith("stunnel ") and found["stunnel_cipher"]
    else:
        assert found["stunnel_available"] is False and "stunnel4" in found["stunnel_skipped"]
        assert stderr.count("stunnel chain is not measured") == 1, stderr


def assert_positive(found: dict, *fields: str) -> None:
    for field in fields:
        assert isinstance(found[field], (int, float)) and found[field] > 0, (field, found[field])


def test_throughput_reports_every_path() -> None:
    stderr: list[str] = []
    found = run_bench("throughput", "--megabytes", "2", "--rounds", "1", stderr=stderr)
    assert_positive(found, "tunnel_mbps", "direct_mbps")
    assert found["path"] == "dialer agent -> relay -> binder agent"
    if SSH_AVAILABLE:
        assert_positive(found, "ssh_mbps", "ratio_vs_ssh")
        assert found["ssh_cipher"]
    assert_stunnel_said(found, stderr[0])
    if STUNNEL_AVAILABLE:
        assert_positive(found, "stunnel_mbps", "ratio_vs_stunnel")
        assert len(found["rounds_mbps"]["stunnel"]) == 1


def test_latency_reports_percentiles_and_cpu_per_round_trip_for_each_path() -> None:
    stderr: list[str] = []
    # 200 round trips: the tunnel's few hundred us of CPU each add up to several
    # 10 ms ticks of /proc/PID/stat, so its CPU cannot round to zero.
    found = run_bench("latency", "--requests", "200", "--rounds", "1", stderr=stderr)
    assert_positive(found, "tunnel_p50_us", "tunnel_p99_us", "direct_p50_us", "direct_p99_us",
                    "tunnel_cpu_us_per_round_trip")
    assert found["tunnel_p99_us"] >= found["tunnel_p50_us"]
    cpu = found["cpu_us_per_round_trip"]
    assert set(cpu["tunnel"]) == TUNNEL_PROCESSES and cpu["direct"] == {"path_total": 0}
    assert found["tunnel_cpu_us_per_round_trip"] == cpu["tunnel"]["path_total"]
    if SSH_AVAILABLE:
        assert_positive(found, "ssh_p50_us", "ssh_p99_us", "p50_ratio_vs_ssh")
        assert set(cpu["ssh"]) == {"sshd", "ssh_client", "path_total"}
    assert_stunnel_said(found, stderr[0])
    if STUNNEL_AVAILABLE:
        assert_positive(found, "stunnel_p50_us", "stunnel_p99_us", "p50_ratio_vs_stunnel")
        assert set(cpu["stunnel"]) == STUNNEL_PROCESSES
        assert found["stunnel_cpu_us_per_round_trip"] == cpu["stunnel"]["path_total"] >= 0
        assert "cpu_ratio_vs_stunnel" in found
    else:
        assert found["stunnel_cpu_us_per_round_trip"] is None and found["cpu_ratio_vs_stunnel"] is None


def test_agent_cpu_reports_seconds_per_gb_for_every_process_of_every_path() -> None:
    stderr: list[str] = []
    found = run_bench("agent_cpu", "--megabytes", "8", "--rounds", "1", stderr=stderr)
    assert found["agent_cpu_s_per_gb"] >= 0
    assert set(found["tunnel_cpu_s_per_gb"]) == {"binder_agent", "dialer_agent", "relay"}
    assert found["path_cpu_s_per_gb"]["tunnel"] > 0
    if SSH_AVAILABLE:
        assert found["ssh_client_cpu_s_per_gb"] is not None
        assert set(found["ssh_cpu_s_per_gb"]) == {"sshd", "ssh_client"}
    assert_stunnel_said(found, stderr[0])
    if STUNNEL_AVAILABLE:
        assert set(found["stunnel_cpu_s_per_gb"]) == STUNNEL_PROCESSES - {"path_total"}
        assert found["path_cpu_s_per_gb"]["stunnel"] > 0 and found["path_cpu_ratio_vs_stunnel"] > 0


def test_a_missing_stunnel4_is_said_in_the_json_and_on_stderr() -> None:
    stderr: list[str] = []
    env = {**os.environ, "OUTPOST_BENCH_STUNNEL": "/nonexistent/stunnel4"}
    found = run_bench("latency", "--requests", "20", "--rounds", "1", env=env, stderr=stderr)
    assert found["stunnel_available"] is False
    assert found["stunnel_skipped"] == f"stunnel4 not found at /nonexistent/stunnel4: {stunnel_path.MISSING_LINE}"
    assert found["stunnel_p50_us"] is None and found["cpu_ratio_vs_stunnel"] is None
    assert "stunnel" not in found["cpu_us_per_round_trip"]
    lines = [line for line in stderr[0].splitlines() if "stunnel" in line]
    assert lines == [f"bench: {found['stunnel_skipped']}"], stderr[0]
    assert_positive(found, "tunnel_p50_us")


def _echo_through(port: int, context: ssl.SSLContext) -> bytes | None:
    """What comes back of a 5-byte echo through the TLS port, or None when the TLS peer refused us."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=stunnel_path.MIDDLE) as tls:
                tls.sendall(b"hello")
                got = b""
                while len(got) < 5:
                    data = tls.recv(5 - len(got))
                    if not data:
                        return got or None
                    got += data
                return got
    except (ssl.SSLError, OSError):
        return None


@needs_stunnel
def test_the_stunnel_chain_checks_certificates(tmp_path: Path) -> None:
    """The middle carries bytes for a peer with a certificate from the chain's CA, and for no one else."""
    from tests.bench.bench_setup import EchoServer, wait_for_path

    echo = EchoServer()
    chain = stunnel_path.StunnelChain(tmp_path, {"echo": echo.port})
    try:
        chain.start()
        wait_for_path(chain.ports["echo"])
        port = chain.middle_ports["echo"]
        workdir = chain.workdir

        def context(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(workdir / "ca.pem"))
            if cert is not None:
                ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            return ctx

        ours = (workdir / f"{stunnel_path.CLIENT}.pem", workdir / f"{stunnel_path.CLIENT}.key")
        assert _echo_through(port, context(ours)) == b"hello"
        assert _echo_through(port, context(None)) is None
        foreign_dir = tmp_path / "foreign"
        foreign_dir.mkdir()
        foreign = stunnel_path.make_pki(foreign_dir, (stunnel_path.CLIENT,))[stunnel_path.CLIENT]
        assert _echo_through(port, context(foreign)) is None
        assert "certificate" in chain.log(stunnel_path.MIDDLE).lower()
    finally:
        chain.stop()
        echo.close()


def test_footprint_reports_idle_and_busy_memory() -> None:
    found = run_bench("footprint", "--streams", "5", "--payload", "1024")
    assert_positive(found, "agent_idle_rss_mib", "agent_streams_rss_mib")
    assert found["streams_reached_service"] == 5


def test_footprint_measures_an_agent_whose_key_is_in_a_swtpm() -> None:
    from tests.agent.identity.swtpm_harness import SWTPM

    if SWTPM is None:
        pytest.skip("swtpm is not installed (Debian package: swtpm)")
    found = run_bench("footprint", "--key", "tpm", "--streams", "2", "--payload", "1024")
    assert found["key"] == "tpm" and found["key_file"] == ["key.tpm.json"], found["key_file"]
    assert found["goal"] == "agent_idle_rss_mib <= 40"
    assert_positive(found, "agent_idle_rss_mib")
    assert found["streams_reached_service"] == 2


def test_idle_bytes_reports_a_day_of_keepalives_for_both_nat_timeouts() -> None:
    found = run_bench("idle_bytes", "--seconds", "4", "--scaled-interval", "1")
    metered = found["scaled_runs"]["metered"]
    assert metered["exchanges"] >= 2 and metered["reconnects"] == 0 and metered["blackholed"] == 0
    for case in ("metered_nat_600s", "metered_nat_150s", "baseline_ethernet_25s"):
        assert found[case]["with_tcp_ip_headers_kb_per_day"] > found[case]["payload_kb_per_day"] > 0, case
    assert isinstance(found["goal_met_nat_600s"], bool)
    assert found["reports"]["report_payload_bytes"] > 0
    assert found["metered_nat_600s"]["with_reports_worst_case_kb_per_day"] > \
        found["metered_nat_600s"]["with_tcp_ip_headers_kb_per_day"]


def test_fleet_view_reports_list_time_and_presence_writes() -> None:
    found = run_bench("fleet_view", "--identities", "60", "--online", "30")
    assert found["presence_counts"]["online"] == 30 and found["cli_output_identities"] == 61  # and operator
    assert found["api_fleet_s_median"] > 0 and found["cli_identity_list_json_s_median"] > 0
    ethernet, metered = found["presence_writes"]
    assert ethernet["rows_per_minute"] > metered["rows_per_minute"] > 0
    assert ethernet["transactions_per_minute"] == 2.0
    assert found["dashboard_fleet_page_s_median"] > 0 and found["dashboard_fleet_page_bytes"] > 0
    assert isinstance(found["dashboard_goal_met"], bool)


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


def test_loop_stall_reports_the_live_stream_quiet_and_under_load() -> None:
    found = run_bench("loop_stall", "--requests", "30", "--renewals", "10", "--identities", "2", "--binds", "3",
                      "--opens", "20", "--concurrency", "4", "--tiny-messages", "2")
    assert_positive(found, "quiet_p50_us", "quiet_p99_us", "loaded_p50_us", "loaded_p99_us", "open_flood_p99_us",
                    "p99_ratio_loaded_vs_quiet", "tiny_frames_p50_us", "tiny_frames_p99_us")
    assert found["phases"]["renewals_and_binds"]["renewals"] == 10
    assert found["phases"]["open_flood"]["refused"] == 20
    assert found["phases"]["tiny_frames"]["frames"] > 50_000


def test_idle_connections_reports_memory_per_connection_and_the_tunnels_round_trip() -> None:
    found = run_bench("idle_connections", "--connections", "20", "--after-close-wait", "1")
    assert found["loops"], found
    for result in found["loops"].values():
        assert result["connections"] == 20
        assert_positive(result["tunnel_round_trip"]["holding"], "p50_ms", "p99_ms")
        assert result["controller_rss_kib"]["holding"] > 0


def test_signin_bench_runs_or_says_why_not() -> None:
    found = run_bench("signin", "--signins", "2", "--requests", "5")
    if "skipped" in found:
        assert "node" in found["skipped"]
        return
    assert found["device_signin_ms"]["n"] == 2 and found["request_ms"]["person_session"]["p50"] > 0


def test_store_throughput_reports_enrollment_and_renewal_on_each_store() -> None:
    stderr: list[str] = []
    found = run_bench("store_throughput", "--count", "8", "--concurrency", "4", stderr=stderr)
    assert_positive(found["sqlite"], "enroll_per_s", "renew_per_s")
    if found["postgresql"] is None:
        assert "PostgreSQL is not measured" in stderr[0] and found["postgresql_skipped"]
    else:
        assert_positive(found["postgresql"], "enroll_per_s", "renew_per_s", "enroll_per_s_two_processes")


def test_audit_verify_reports_seconds_per_million_events() -> None:
    found = run_bench("audit_verify", "--events", "2000")
    assert found["events"] == 2000 and isinstance(found["goal_met"], bool)
    assert_positive(found, "verify_seconds", "verify_events_per_second", "verify_seconds_per_million")


def test_audit_write_reports_a_stops_rows_alone_and_beside_a_busy_thread() -> None:
    found = run_bench("audit_write", "--rows", "500", "--rounds", "1")
    assert found["rows"] == 500 and len(found["alone_all_s"]) == len(found["beside_busy_thread_all_s"]) == 1
    assert_positive(found, "alone_s", "beside_busy_thread_s", "alone_us_per_row", "beside_busy_thread_us_per_row")


def test_policy_decisions_reports_decisions_per_second_and_no_commit_per_decision() -> None:
    found = run_bench("policy_decisions", "--policies", "20", "--decisions", "200")
    assert found["decisions_per_s"] > 0 and found["store_commits_while_deciding"] == 0
    assert found["counted"] == 100 and found["flush_policies"] == 1


def test_fleet_scale_reports_memory_cpu_storm_and_stop_for_a_small_fleet() -> None:
    found = run_bench("fleet_scale", "--tunnels", "20", "--ramp", "4")
    assert found["tunnels"] == 20 and found["ramp_in_flight"] == 4
    assert_positive(found, "relay_kib_per_tunnel", "established_s", "admission_cpu_ms", "storm_all_back_s",
                    "graceful_stop_s", "stop_cpu_s", "stop_before_storm_cpu_s")
    assert len(found["stop_load_average"]) == 3
    assert found["relay_idle_cpu_pct"] >= 0 and found["storm_failed_attempts"] >= 0
    assert all(isinstance(why, str) and count > 0 for why, count in found["storm_failures_by_reason"].items())
    assert found["relay_error_lines"] == []
    for phase in ("admission_cpu_ms_by_thread", "storm_admission_cpu_ms_by_thread"):
        assert found[phase]["user_ms"] > 0 and found[phase]["loop_sleeps"] > 0, found[phase]
    assert found["storm_admission_cpu_ms_by_thread"]["load_process_cpu_pct"] > 0


def test_cross_relay_reports_latency_and_throughput_next_to_one_relay() -> None:
    found = run_bench("cross_relay", "--rounds", "1", "--requests", "50", "--megabytes", "2")
    assert_positive(found, "one_relay_p50_us", "cross_relay_p50_us", "one_relay_mbit_s", "cross_relay_mbit_s",
                    "throughput_ratio")
    assert found["path_cross_relay"] == "dialer agent -> relay A -> link -> relay B -> binder agent"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/setup)")
def test_syscalls_counts_each_process_of_each_path_per_round_trip() -> None:
    found = run_bench("syscalls", "--requests", "100")
    tunnel = found["per_process"]["tunnel"]
    assert set(tunnel) == TUNNEL_PROCESSES - {"path_total"}
    for counted in tunnel.values():
        # At least a read and a write each way per round trip: a tracer that saw nothing fails here.
        assert counted["syscalls_per_round_trip"] >= 4, counted
        assert counted["by_name"], counted
    assert found["tunnel_syscalls_per_round_trip"] == round(
        sum(c["syscalls_per_round_trip"] for c in tunnel.values()), 2)
    if STUNNEL_AVAILABLE:
        assert set(found["per_process"]["stunnel"]) == STUNNEL_PROCESSES - {"path_total"}
    else:
        assert "stunnel4" in found["stunnel_skipped"]


def test_core_per_message_reports_the_protocol_cores_time_per_round_trip() -> None:
    found = run_bench("core_per_message", "--requests", "200", "--rounds", "2")
    assert found["requests"] == 200 and found["rounds"] == 2
    assert 0 < found["core_us_per_round_trip_best"] <= found["core_us_per_round_trip"]


def test_tls_copies_reports_each_way_of_sending_and_receiving() -> None:
    found = run_bench("tls_copies", "--flushes", "20", "--rounds", "2")
    assert found["flushes"] == 20 and found["rounds"] == 2
    assert set(found["send_cpu_s_per_gb"]) == {"joined", "records"}
    assert set(found["receive_cpu_s_per_gb"]) == {"copied", "buffered"}
    assert all(len(values) == 2 for values in found["rounds_send_cpu_s_per_gb"].values())


def test_store_move_reports_how_long_a_box_store_takes_to_move() -> None:
    found = run_bench("store_move", "--events", "500", "--identities", "20")
    if "skipped" in found:
        assert "PostgreSQL" in found["skipped"] or "psycopg" in found["skipped"]
    else:
        assert found["audit_rows"] >= 500 and found["rows"] > found["audit_rows"]
        assert_positive(found, "move_seconds", "rows_per_second")


def _profile_path(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "profile_path.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, env=env)


def test_profile_path_reports_the_top_functions_of_each_process_for_bulk_and_small_messages() -> None:
    from tests.bench import profile_path

    why = profile_path.unavailable()
    if why:
        pytest.skip(why)
    top = 5
    found = run_bench("profile_path", "--seconds", "1", "--rate", "50", "--top", str(top), "--megabytes", "8")
    assert found["rate_hz"] == 50 and found["top"] == top and found["py_spy"].startswith("py-spy ")
    assert set(found["workloads"]) == {"bulk", "small"}
    assert found["workloads"]["bulk"]["transfers"] >= 1 and found["workloads"]["small"]["round_trips"] >= 1
    for name, workload in found["workloads"].items():
        assert set(workload["processes"]) == set(profile_path.PROCESSES), name
        # The dialer agent encrypts every byte and message of both workloads: a sampler that saw nothing fails here.
        assert workload["processes"]["dialer_agent"]["samples"] > 0, (name, workload)
        for process, profile in workload["processes"].items():
            assert profile["cpu_share"] >= 0 and 0 <= profile["busiest_thread_busy_share"]
            for ranking in ("self", "total"):
                entries = profile[ranking]
                assert len(entries) <= top, (name, process, ranking)
                samples = [entry["samples"] for entry in entries]
                assert samples == sorted(samples, reverse=True) and all(n > 0 for n in samples)
                for entry in entries:
                    assert " (" in entry["function"] and entry["function"].endswith(")"), entry
                    assert entry["share"] == round(entry["samples"] / profile["samples"], 4)
            assert sum(entry["samples"] for entry in profile["self"]) <= profile["samples"]
            busy = profile["loop_thread_busy"]
            assert sum(entry["samples"] for entry in busy["by_code"]) == busy["samples"] <= profile["samples"]
            if profile["samples"]:
                # A function's own samples are among its total ones.
                assert profile["samples"] >= profile["total"][0]["samples"] >= profile["self"][0]["samples"]


def test_profile_path_says_in_one_line_that_py_spy_is_missing() -> None:
    result = _profile_path("--seconds", "1", env={**os.environ, "OUTPOST_BENCH_PY_SPY": "/nonexistent/py-spy"})
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "profile_path: py-spy not found at /nonexistent/py-spy: install it with .venv/bin/pip install py-spy "
        "(pyproject.toml's test extra)"], result.stderr


def test_profile_path_says_in_one_line_that_ptrace_is_refused(tmp_path: Path) -> None:
    """py-spy without CAP_SYS_PTRACE, on a process that has it: the kernel refuses, and the script says so."""
    from tests.bench import profile_path

    spy, setpriv = profile_path.py_spy(), shutil.which("setpriv")
    if os.geteuid() != 0 or spy is None or setpriv is None:
        pytest.skip("needs root, py-spy and setpriv (util-linux) to run py-spy with less privilege than its target")
    wrapper = tmp_path / "py-spy"
    wrapper.write_text(f"#!/bin/sh\nexec {setpriv} --bounding-set -sys_ptrace --inh-caps -sys_ptrace {spy} \"$@\"\n")
    wrapper.chmod(0o755)
    result = _profile_path("--seconds", "1", env={**os.environ, "OUTPOST_BENCH_PY_SPY": str(wrapper)})
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile_path: py-spy cannot sample a Python process here"), lines
    assert "ptrace" in lines[0]


def test_profile_path_adds_the_loop_threads_busy_samples_up_by_code() -> None:
    """Unsymbolised addresses of one library add up; the loop's wait and the worker threads are left out."""
    from tests.bench import profile_path

    loop = ["_run_module_as_main (<frozen runpy>)", "Runner.run (asyncio/runners.py)", "uv_run (core.c)"]
    stacks = [
        ("thread (0x1)", [*loop, "epoll_pwait (libc.so.6)"], 50),
        ("thread (0x1)", [*loop, "write (libc.so.6)"], 20),
        ("thread (0x1)", [*loop, "0x7f0000001000 (libcrypto.so.3)"], 3),
        ("thread (0x1)", [*loop, "0x7f0000002000 (libcrypto.so.3)"], 4),
        ("thread (0x1)", [*loop, "TunnelSession.flush_nowait (shared/tunnel/session.py)"], 6),
        ("thread (0x2)", ["_worker (concurrent/futures/thread.py)", "0x7f0000003000 (libc.so.6)"], 40),
    ]
    busy = profile_path.loop_thread_busy(stacks)
    assert busy["samples"] == 33
    assert [(entry["code"], entry["samples"]) for entry in busy["by_code"]] == [
        ("write system call", 20), ("libcrypto.so.3", 7), ("Python code", 6)]
