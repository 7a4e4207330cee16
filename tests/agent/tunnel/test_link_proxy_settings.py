"""The HTTPS proxy: from [link] or the environment alike (credentials too), one routing decision per URL, bypassed for NO_PROXY hosts."""

from __future__ import annotations

import pytest

from agent.config import AgentConfig, with_environment_proxy
from agent.config_file import load_config
from agent.errors import ConfigError
from agent.proxy import DIRECT, ProxySettings, bypasses_proxy, environment_proxy, proxy_credentials

SECRET = "s3cret"

RELAY = "wss://relay.example.com:8443/v1/tunnel"


def test_the_lowercase_variable_wins_is_named_as_the_source_and_no_proxy_is_split() -> None:
    env = {"https_proxy": "http://low:3128", "HTTPS_PROXY": "http://up:3128", "NO_PROXY": "localhost, .corp.lan"}
    assert environment_proxy(DIRECT, env) == ProxySettings("http://low:3128", ("localhost", ".corp.lan"), "https_proxy")
    assert environment_proxy(DIRECT, {}) == DIRECT


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


def test_one_decision_routes_every_url_through_the_proxy_or_directly() -> None:
    proxy = ProxySettings("http://p:3128", ("corp.lan",))
    for url in (RELAY, "https://ops.example.com/v1/enroll", "https://10.1.2.3:8443/v1/time"):
        assert proxy.route(url).url == "http://p:3128"
        assert proxy.request_options(url) == {"proxy": "http://p:3128", "proxy_headers": None}
    assert proxy.route("https://ops.corp.lan/v1/renew") is None and proxy.request_options("https://ops.corp.lan") == {}
    assert DIRECT.route(RELAY) is None and DIRECT.request_options(RELAY) == {}


def test_a_login_becomes_the_connect_header_and_never_shows_in_a_repr() -> None:
    proxy = ProxySettings(f"http://outpost:{SECRET}@proxy.lan:3128")
    options = proxy.request_options(RELAY)
    assert options == {"proxy": "http://proxy.lan:3128",
                       "proxy_headers": {"Proxy-Authorization": "Basic b3V0cG9zdDpzM2NyZXQ="}}
    options["proxy_headers"]["Host"] = "changed"  # as aiohttp 3.8 does to the dict it is given
    assert proxy.request_options(RELAY)["proxy_headers"] == {"Proxy-Authorization": "Basic b3V0cG9zdDpzM2NyZXQ="}
    for shown in (repr(proxy), repr(proxy.route(RELAY)), repr(AgentConfig(proxy=proxy))):
        assert SECRET not in shown and "b3V0cG9zdDpzM2NyZXQ=" not in shown, shown


@pytest.mark.parametrize("status, login, advice", [
    (407, True, "; check the user and password in [link] proxy"),
    (407, False, ': it asks for a login; give it in [link] proxy as "http://user:password@host:port"'),
    (403, False, "; ask whoever runs the proxy to allow CONNECT to that host and port, or list the host in "
                 "[link] no_proxy if it is reachable without the proxy"),
    (502, False, ": the proxy could not reach it; check that address, or ask whoever runs the proxy whether it "
                 "can reach the controller"),
])
def test_a_refusal_says_what_to_fix_by_its_status(status: int, login: bool, advice: str) -> None:
    url = f"http://outpost:{SECRET}@proxy.lan:3128" if login else "http://proxy.lan:3128"
    sentence = ProxySettings(url).route(RELAY).refused(status, "the relay")
    assert sentence == f"the proxy http://proxy.lan:3128 refused to carry the connection to the relay (HTTP {status})" + advice


def test_the_config_proxy_wins_over_the_environment() -> None:
    config = AgentConfig(proxy=ProxySettings("http://config:3128"))
    assert with_environment_proxy(config, {"HTTPS_PROXY": "http://env:3128"}) is config


def test_the_environment_fills_in_when_the_config_is_silent() -> None:
    config = with_environment_proxy(AgentConfig(), {"HTTPS_PROXY": "http://env:3128", "no_proxy": "corp.lan"})
    assert config.proxy == ProxySettings("http://env:3128", ("corp.lan",), "HTTPS_PROXY")


def test_an_https_proxy_in_the_environment_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match='HTTPS_PROXY uses https://; give the proxy as "http://host:port"'):
        with_environment_proxy(AgentConfig(), {"HTTPS_PROXY": "https://p:3128"})


def write(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_proxy_with_credentials_is_accepted_from_the_config_and_from_the_environment(tmp_path) -> None:
    url = f"http://outpost:{SECRET}@proxy.lan:3128"
    assert load_config(write(tmp_path, f'[link]\nproxy = "{url}"\n')).proxy == ProxySettings(url)
    assert with_environment_proxy(AgentConfig(), {"HTTPS_PROXY": url}).proxy.url == url


@pytest.mark.parametrize("url", [f"http://outpost:{SECRET}@proxy.lan:3128/path", f"ftp://outpost:{SECRET}@proxy.lan",
                                 f"http://outpost:{SECRET}@proxy.lan:99999"])
def test_a_malformed_proxy_url_is_refused_alike_from_both_and_the_password_is_never_shown(tmp_path, url: str) -> None:
    path = write(tmp_path, f'[link]\nproxy = "{url}"\n')
    with pytest.raises(ConfigError, match="give it as") as from_file:
        load_config(path)
    with pytest.raises(ConfigError, match="give it as") as from_env:
        with_environment_proxy(AgentConfig(), {"https_proxy": url})
    for error in (from_file.value, from_env.value):
        message = str(error)
        assert SECRET not in message and "//***@proxy.lan" in message and "\n" not in message
    assert str(path) in str(from_file.value) and str(from_env.value).startswith("https_proxy is ")


def test_credentials_leave_the_url_for_the_connect_request() -> None:
    assert proxy_credentials("http://outpost:s%40cret@proxy.lan:3128") == ("http://proxy.lan:3128", ("outpost", "s@cret"))
    assert proxy_credentials("http://[::1]:3128") == ("http://[::1]:3128", None)


def test_no_proxy_from_the_environment_is_honoured_with_a_proxy_from_the_config() -> None:
    config = AgentConfig(proxy=ProxySettings("http://config:3128"))
    updated = with_environment_proxy(config, {"NO_PROXY": "relay.corp.lan"})
    assert updated.proxy == ProxySettings("http://config:3128", ("relay.corp.lan",))


def test_no_proxy_in_the_config_wins_over_the_environment(tmp_path) -> None:
    config = load_config(write(tmp_path, '[link]\nproxy = "http://p:3128"\nno_proxy = ["Relay.Corp.Lan", "10.0.0.0/8"]\n'))
    assert config.proxy == ProxySettings("http://p:3128", ("relay.corp.lan", "10.0.0.0/8"))
    assert with_environment_proxy(config, {"NO_PROXY": "elsewhere"}) is config


def test_a_malformed_no_proxy_list_is_one_sentence_naming_the_file(tmp_path) -> None:
    path = write(tmp_path, '[link]\nno_proxy = "relay.corp.lan"\n')
    with pytest.raises(ConfigError, match="'link.no_proxy' must be a list") as error:
        load_config(path)
    assert str(path) in str(error.value)
