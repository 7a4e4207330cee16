"""The agent's report: sent on each tunnel, then only on meaningful change, at most once per interval."""

from __future__ import annotations

import json
from pathlib import Path

from agent.tunnel.report import (
    CLOCK_OFFSET_CHANGE_S,
    REPORT_MIN_INTERVAL,
    RTT_CHANGE_MIN_MS,
    Reporter,
    _text,
    build_report,
    changed_meaningfully,
    operating_system,
    static_facts,
)
from agent.tunnel.status import TunnelStats
from shared.protocol import Connection, ReportReceived, Role
from shared.protocol.control import MAX_REPORT_BYTES, MAX_REPORT_TEXT_CHARS, decode_report

URI = "spiffe://example.org/default/gw-1"


class Tunnel:
    """The part of an AgentSession a Reporter uses, around a real authenticated protocol pair."""

    def __init__(self, reports: bool = True) -> None:
        self.relay = Connection(Role.RELAY, 0.0)
        self.conn = Connection(Role.AGENT, 0.0)
        self.relay.send_challenge(bytes(32))
        self.conn.receive_data(self.relay.data_to_send(), 0.0)
        self.conn.send_auth(["pem"], b"sig")
        self.relay.receive_data(self.conn.data_to_send(), 0.0)
        self.relay.accept_auth({"reports": reports})
        self.conn.receive_data(self.relay.data_to_send(), 0.0)
        self.relay_info = {"reports": True} if reports else {}
        self.flushes = 0

    def schedule_flush(self) -> None:
        self.flushes += 1

    def received(self) -> list[dict]:
        events = self.relay.receive_data(self.conn.data_to_send(), 1.0)
        return [e.report for e in events if isinstance(e, ReportReceived)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reporter(clock: Clock) -> Reporter:
    return Reporter(static_facts(URI, "metered", 540.0, "tpm"), clock)


def stats(**overrides) -> TunnelStats:
    base = dict(rtt_ms=None, clock_offset_s=0.1, clock_source="ntp", cert_not_after=2e9, next_renewal=1.9e9)
    return TunnelStats(**{**base, **overrides})


def test_the_first_report_of_every_tunnel_goes_at_once_with_every_field() -> None:
    clock, tunnel = Clock(), Tunnel()
    r = reporter(clock)
    assert r.offer(tunnel, stats()) and tunnel.flushes == 1
    [report] = tunnel.received()
    assert report["identity"] == URI and report["link_profile"] == "metered" and report["key_backend"] == "tpm"
    assert report["keepalive_s"] == 540.0 and report["clock_offset_s"] == 0.1 and report["cert_not_after"] == 2e9
    assert report["agent_version"] and report["arch"] and report["os"]
    again = Tunnel()
    assert r.offer(again, stats()) and len(again.received()) == 1  # a new tunnel: the relay may know nothing


def test_nothing_meaningful_sends_nothing_however_often_it_is_offered() -> None:
    clock, tunnel = Clock(), Tunnel()
    r = reporter(clock)
    r.offer(tunnel, stats(rtt_ms=80.0))
    tunnel.received()
    for step in range(1, 500):
        clock.now += 10
        jitter = 80.0 + (step % 7) * 5  # ±35 ms: under half of 80 ms... and over 20 ms, so the share decides
        assert not r.offer(tunnel, stats(rtt_ms=jitter, clock_offset_s=0.1 + (step % 3) * 0.2))
    assert tunnel.received() == [] and r.sent == 1


def test_a_meaningful_change_waits_for_the_interval_then_goes_once() -> None:
    clock, tunnel = Clock(), Tunnel()
    r = reporter(clock)
    r.offer(tunnel, stats(rtt_ms=80.0))
    tunnel.received()
    clock.now += 60
    changed = stats(rtt_ms=400.0)
    assert not r.offer(tunnel, changed)
    clock.now += REPORT_MIN_INTERVAL
    assert r.offer(tunnel, changed)
    assert [rep["rtt_ms"] for rep in tunnel.received()] == [400.0]
    assert not r.offer(tunnel, changed)


def test_the_first_round_trip_of_a_tunnel_goes_at_once_but_only_once() -> None:
    clock, tunnel = Clock(), Tunnel()
    r = reporter(clock)
    r.offer(tunnel, stats())
    clock.now += 30
    assert r.offer(tunnel, stats(rtt_ms=90.0))
    clock.now += 30
    assert not r.offer(tunnel, stats(rtt_ms=900.0))  # any later change waits for the interval


def test_the_rules_of_meaningful_change() -> None:
    base = build_report(static_facts(URI, "metered", 540.0, "tpm"), stats(rtt_ms=100.0))
    assert not changed_meaningfully(base, dict(base))
    assert changed_meaningfully(base, {**base, "rtt_ms": 151.0 + RTT_CHANGE_MIN_MS})
    assert not changed_meaningfully(base, {**base, "rtt_ms": 140.0})  # 40 %: jitter
    small = {**base, "rtt_ms": 10.0}
    assert not changed_meaningfully(small, {**small, "rtt_ms": 25.0})  # +150 % but 15 ms: a LAN's noise
    assert not changed_meaningfully(base, {**base, "rtt_ms": None})  # a tunnel gone says nothing new
    assert changed_meaningfully(base, {**base, "clock_offset_s": 0.1 + CLOCK_OFFSET_CHANGE_S + 0.01})
    assert changed_meaningfully(base, {**base, "cert_not_after": 2e9 + 86400})  # renewed
    assert not changed_meaningfully(base, {**base, "next_renewal": 1.9e9 + 30})
    assert changed_meaningfully(base, {**base, "renewal_error": "the controller refused: disabled"})
    assert changed_meaningfully(base, {**base, "clock_source": "controller"})


def test_a_relay_from_before_reports_gets_none() -> None:
    clock, tunnel = Clock(), Tunnel(reports=False)
    assert not reporter(clock).offer(tunnel, stats())
    assert tunnel.conn.data_to_send() == b""


def test_long_or_unprintable_text_is_cut_to_what_the_relay_accepts(tmp_path: Path) -> None:
    release = tmp_path / "os-release"
    release.write_text('NAME=x\nPRETTY_NAME="Debian GNU/Linux 12 ' + "\u00e9" * 500 + '"\n')
    facts = static_facts(URI, "metered", 540.0, "software")
    facts["os"] = _text(operating_system(release) + "\x00")
    report = build_report(facts, stats(renewal_error="why\n" * 500))
    payload = json.dumps(report, ensure_ascii=False).encode()
    assert len(payload) <= MAX_REPORT_BYTES
    decoded = decode_report(payload)
    assert decoded["os"].startswith("Debian GNU/Linux 12") and len(decoded["os"]) == MAX_REPORT_TEXT_CHARS
    assert decoded["renewal_error"].startswith("why why")


def test_os_name_without_os_release() -> None:
    assert operating_system(Path("/nonexistent/os-release"))
