"""Link profiles turn into timers that stay under the NAT timeout, and every number can be overridden."""

from __future__ import annotations

import pytest

from agent.config import LinkSettings, load_config
from agent.errors import ConfigError
from agent.tunnel.link_profiles import NAT_MARGIN, PROFILES, SATELLITE_WINDOW, keepalive_for, plan_for, plan_from_settings


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_pings_before_its_nat_forgets_the_tunnel(profile: str) -> None:
    plan = plan_for(profile)
    assert plan.liveness.keepalive_interval <= plan.nat_timeout - NAT_MARGIN
    assert plan.reconnect_initial <= plan.reconnect_max


def test_cellular_follows_the_nat_timeout_and_ethernet_pings_often() -> None:
    assert plan_for("cellular").liveness.keepalive_interval == 110.0
    assert plan_for("cellular", nat_timeout=150).liveness.keepalive_interval == 140.0
    assert plan_for("ethernet", nat_timeout=3600).liveness.keepalive_interval == 25.0
    assert plan_for("ethernet").detection_bound == 35.0


def test_metered_with_a_ten_minute_nat_pings_about_146_times_a_day() -> None:
    plan = plan_for("metered", nat_timeout=600)
    assert plan.liveness.keepalive_interval == 590.0
    assert plan.pings_per_day() == pytest.approx(146.4, abs=0.1)


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


def test_a_tiny_nat_timeout_still_gets_a_keepalive_inside_it() -> None:
    assert keepalive_for(5.0, None) == 2.5
    assert keepalive_for(1.0, None) == 1.0 and keepalive_for(1.0, None) <= 1.0


def test_settings_map_to_a_plan() -> None:
    plan = plan_from_settings(LinkSettings(profile="metered", nat_timeout=600.0, proxy="http://127.0.0.1:3128"))
    assert plan.liveness.keepalive_interval == 590.0 and plan.proxy == "http://127.0.0.1:3128"


def write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_the_config_file_sets_every_link_number(tmp_path) -> None:
    config = load_config(write(tmp_path, '[link]\nprofile = "metered"\nnat_timeout = 600\nping_timeout = 25\n'
                                         'window = 1048576\nreconnect_initial = 3\nreconnect_max = 600\n'
                                         'proxy = "http://proxy.lan:3128"\n'))
    assert config.link == LinkSettings(profile="metered", nat_timeout=600.0, ping_timeout=25.0, window=1048576,
                                       reconnect_initial=3.0, reconnect_max=600.0, proxy="http://proxy.lan:3128")


@pytest.mark.parametrize("text, message", [
    ('profile = "dialup"', "must be one of ethernet, cellular, satellite, metered"),
    ("keepalive_interval = 130\nnat_timeout = 120", "below the NAT timeout"),
    ("window = 100", "whole number of bytes"),
    ('proxy = "https://proxy:3128"', "uses https://"),
    ('proxy = "socks5://proxy:1080"', "give it as"),
    ("reconnect_initial = 100\nreconnect_max = 10", "must not exceed reconnect_max"),
    ("nat_timeout = -1", "above 0"),
])
def test_a_wrong_link_setting_is_one_sentence_naming_the_file(tmp_path, text: str, message: str) -> None:
    path = write(tmp_path, "[link]\n" + text + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
