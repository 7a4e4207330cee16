"""Link profiles turn into timers that stay under the NAT timeout, and every number can be overridden."""

from __future__ import annotations

import pytest

from agent.config import LinkSettings
from agent.config_file import load_config
from agent.errors import ConfigError
from agent.tunnel.link_profiles import (
    MIN_KEEPALIVE,
    PROFILES,
    SATELLITE_WINDOW,
    keepalive_for,
    nat_margin,
    plan_for,
    plan_from_settings,
)

# One idle keepalive exchange on the wire: PING 18 + WebSocket 6 + TLS 22 bytes
# up, PONG 18 + 2 + 22 down, and three segments (PING, PONG, the PONG's ACK) of
# 52 bytes of IPv4+TCP headers; tests/bench/idle_bytes.py measures the payload.
BYTES_PER_KEEPALIVE = 46 + 42 + 3 * 52


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_pings_before_its_nat_forgets_the_tunnel(profile: str) -> None:
    plan = plan_for(profile)
    assert plan.liveness.keepalive_interval <= plan.nat_timeout - nat_margin(plan.nat_timeout)
    assert plan.reconnect_initial <= plan.reconnect_max


def test_cellular_follows_the_nat_timeout_and_ethernet_pings_often() -> None:
    assert plan_for("cellular").liveness.keepalive_interval == 108.0
    assert plan_for("cellular", nat_timeout=150).liveness.keepalive_interval == 135.0
    assert plan_for("ethernet", nat_timeout=3600).liveness.keepalive_interval == 25.0
    assert plan_for("ethernet").detection_bound == 35.0


def test_the_margin_before_the_nat_timeout_grows_with_it() -> None:
    assert nat_margin(60) == 10.0  # at least 10 s
    assert nat_margin(600) == 60.0  # a tenth: a long timeout is a rough measurement
    assert plan_for("metered", nat_timeout=3600).liveness.keepalive_interval == 3240.0


def test_metered_with_a_ten_minute_nat_keeps_a_minute_of_margin_within_100_kb_a_day() -> None:
    plan = plan_for("metered", nat_timeout=600)
    assert plan.liveness.keepalive_interval == 540.0
    assert plan.pings_per_day() == pytest.approx(160.0)
    assert plan.pings_per_day() * BYTES_PER_KEEPALIVE <= 100_000


def test_satellite_gets_a_window_for_its_bandwidth_delay_product() -> None:
    plan = plan_for("satellite")
    # 20 Mbit/s x 600 ms = 1.5 MB in flight; credit comes back in half-window batches.
    assert plan.limits.initial_window == SATELLITE_WINDOW >= 2 * 1_500_000
    assert plan.liveness.ping_timeout >= 10 * 2.0  # many LEO stalls


def test_overrides_win_over_the_profile() -> None:
    plan = plan_for("satellite", keepalive_interval=45, ping_timeout=12, window=1 << 20, reconnect_initial=2,
                    reconnect_max=60)
    assert (plan.liveness.keepalive_interval, plan.liveness.ping_timeout) == (45, 12)
    assert plan.limits.initial_window == 1 << 20
    assert (plan.reconnect_initial, plan.reconnect_max) == (2, 60)


def test_a_keepalive_at_or_above_the_nat_timeout_is_refused() -> None:
    with pytest.raises(ConfigError, match="below the NAT timeout"):
        plan_for("cellular", keepalive_interval=120, nat_timeout=120)


def test_a_tiny_nat_timeout_gets_a_keepalive_at_half_of_it() -> None:
    assert keepalive_for(5.0, None) == 2.5
    assert keepalive_for(2.0, None) == MIN_KEEPALIVE


def test_a_nat_timeout_too_short_for_any_keepalive_is_refused_naming_the_nat_timeout() -> None:
    with pytest.raises(ConfigError, match="set nat_timeout to at least 2 s") as error:
        plan_for("cellular", nat_timeout=1)
    assert "keepalive_interval" not in str(error.value)


def test_settings_map_to_a_plan() -> None:
    plan = plan_from_settings(LinkSettings(profile="metered", nat_timeout=600.0, stable_after=300.0))
    assert plan.liveness.keepalive_interval == 540.0
    assert plan.stable_after == 300.0


def write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_config_file_sets_every_link_number(tmp_path) -> None:
    config = load_config(write(tmp_path, '[link]\nprofile = "metered"\nnat_timeout = 600\nping_timeout = 25\n'
                                         'window = 1048576\nreconnect_initial = 3\nreconnect_max = 600\n'
                                         'stable_after = 300\nproxy = "http://proxy.lan:3128"\n'))
    assert config.link == LinkSettings(profile="metered", nat_timeout=600.0, ping_timeout=25.0, window=1048576,
                                       reconnect_initial=3.0, reconnect_max=600.0, stable_after=300.0)
    assert config.proxy.url == "http://proxy.lan:3128"


@pytest.mark.parametrize("text, message", [
    ('profile = "dialup"', "must be one of ethernet, cellular, satellite, metered"),
    ("keepalive_interval = 130\nnat_timeout = 120", "below the NAT timeout"),
    ("window = 100", "whole number of bytes"),
    ('proxy = "https://proxy:3128"', "uses https://"),
    ('proxy = "socks5://proxy:1080"', "give it as"),
    ("reconnect_initial = 100\nreconnect_max = 10", "must not exceed reconnect_max"),
    ("nat_timeout = -1", "above 0"),
    ("nat_timeout = 1", "set nat_timeout to at least 2 s"),
    ("stable_after = 0", "above 0"),
])
def test_a_wrong_link_setting_is_one_sentence_naming_the_file(tmp_path, text: str, message: str) -> None:
    path = write(tmp_path, "[link]\n" + text + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
