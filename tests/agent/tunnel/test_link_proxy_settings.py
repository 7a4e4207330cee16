"""The HTTPS proxy: from the environment at the edge, bypassed for NO_PROXY hosts."""

from __future__ import annotations

import pytest

from agent.cli import with_environment_proxy
from agent.config import AgentConfig, LinkSettings
from agent.errors import ConfigError
from agent.tunnel.proxy import bypasses_proxy, proxy_for, proxy_settings_from_environment

RELAY = "wss://relay.example.com:8443/v1/tunnel"


def test_the_lowercase_variable_wins_and_no_proxy_is_split() -> None:
    env = {"https_proxy": "http://low:3128", "HTTPS_PROXY": "http://up:3128", "NO_PROXY": "localhost, .corp.lan"}
    assert proxy_settings_from_environment(env) == ("http://low:3128", ("localhost", ".corp.lan"))
    assert proxy_settings_from_environment({}) == (None, ())


@pytest.mark.parametrize("host, entries, bypass", [
    ("relay.example.com", ("example.com",), True),
    ("relay.example.com", (".example.com",), True),
    ("relay.example.com", ("ample.com",), False),
    ("10.1.2.3", ("10.0.0.0/8",), True),
    ("relay.example.com", ("*",), True),
    ("relay.example.com", ("relay.example.com:8443",), True),
    ("relay.example.com", (), False),
])
def test_no_proxy_matching(host: str, entries: tuple, bypass: bool) -> None:
    assert bypasses_proxy(host, entries) is bypass


def test_proxy_for_a_relay() -> None:
    assert proxy_for(RELAY, "http://p:3128") == "http://p:3128"
    assert proxy_for(RELAY, "http://p:3128", ("example.com",)) is None
    assert proxy_for(RELAY, None) is None


def test_the_config_proxy_wins_over_the_environment() -> None:
    config = AgentConfig(link=LinkSettings(proxy="http://config:3128"))
    assert with_environment_proxy(config, {"HTTPS_PROXY": "http://env:3128"}) is config


def test_the_environment_fills_in_when_the_config_is_silent() -> None:
    config = with_environment_proxy(AgentConfig(), {"HTTPS_PROXY": "http://env:3128", "no_proxy": "corp.lan"})
    assert config.link.proxy == "http://env:3128" and config.link.no_proxy == ("corp.lan",)


def test_an_https_proxy_in_the_environment_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="HTTPS_PROXY is 'https://p:3128'; give it as http://host:port"):
        with_environment_proxy(AgentConfig(), {"HTTPS_PROXY": "https://p:3128"})
