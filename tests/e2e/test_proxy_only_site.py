"""A site whose only way out is an HTTPS proxy: the agent enrolls, renews, measures its clock, tunnels and is
doctored through it, and a proxy that refuses is one clear line that changes nothing.

The controller listens on 127.0.0.1 only but advertises ``PROXY_ONLY_HOST``
(127.0.0.2), where nothing listens: a direct connection is refused, and the
test proxy maps that address to the controller, as a site proxy reaches what
the gateway cannot. The proxy asks for a login. The agents are the real CLI,
run as processes; the password is checked never to appear in what they print
or log.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clock.controller_time import fetch_controller_time
from agent.errors import EXIT_UNAVAILABLE, ControllerUnreachable, TrustError
from agent.identity.keeper import CertificateKeeper
from agent.identity.pinned_tls import FixedTime, PinnedTLS
from agent.identity.select import KeyStoreSettings, open_keystore
from agent.identity.state import StateDir
from agent.proxy import ProxySettings
from tests.agent.cli_helpers import doctor_lines
from tests.e2e.clock_harness import ControllerProcess, write_agent_config
from tests.e2e.connect_proxy import PROXY_ONLY_HOST, ConnectProxy, proxy_in_thread
from tests.e2e.harness import Controller, Process, free_port, python_env, read_status, run_cli, wait_until

USER = "gateway"
SECRET = "s1te-pr0xy-secret"
#: Enrollment through the proxy: the CA fetch, the controller's time, the redemption (each its own connection).
ENROLL_CONNECTIONS = 3
#: Field enrollment, the first clock measurement and a tunnel through the proxy on loopback take seconds.
RUN_TIMEOUT = 60.0


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[ControllerProcess, ConnectProxy]]:
    """A controller only the proxy reaches, and the proxy (with a login)."""
    port = free_port()
    controller = ControllerProcess(tmp_path / "controller", port, "--advertise", f"https://{PROXY_ONLY_HOST}:{port}")
    # outpostctl runs beside the controller, not at the site: it talks to the controller directly.
    direct = tmp_path / "outpostctl-direct.toml"
    direct.write_text((tmp_path / "controller" / "outpostctl.toml").read_text().replace(
        f"https://{PROXY_ONLY_HOST}:{port}", f"https://127.0.0.1:{port}"))
    controller.ctl_env["OUTPOSTCTL_CONFIG"] = str(direct)
    try:
        with proxy_in_thread(login=(USER, SECRET), routes={f"{PROXY_ONLY_HOST}:{port}": ("127.0.0.1", port)}) as proxy:
            yield controller, proxy
    finally:
        controller.stop()


def agent_cli(*args: str | Path, env: dict[str, str] | None = None):
    return run_cli("agent", *map(str, args), env=env)


def gateway(tmp_path: Path, controller: ControllerProcess, name: str, proxy_url: str | None,
            no_proxy: list[str] | None = None) -> tuple[Path, Path]:
    """A token for ``name`` and an agent config using ``proxy_url`` from [link] (None: no proxy)."""
    folder = tmp_path / name
    folder.mkdir()
    token = folder / "enroll.token"
    controller.ctl("identity", "create", name, "--token-out", str(token))
    config = write_agent_config(folder, token=token)
    link = [f'proxy = "{proxy_url}"'] if proxy_url else []
    link += [f"no_proxy = {json.dumps(no_proxy)}"] if no_proxy else []
    if link:
        config.write_text(config.read_text() + "\n[link]\n" + "\n".join(link) + "\n")
    return token, config


def one_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("outpost-agent: "), result.stderr
    return lines[0]


def shown(*results) -> str:
    return "".join(r.stdout + r.stderr for r in results)


def test_enroll_renew_time_and_doctor_all_go_through_the_proxy_when_nothing_else_gets_out(site, tmp_path: Path) -> None:
    controller, proxy = site
    port = int(controller.url.rsplit(":", 1)[1])
    target = f"{PROXY_ONLY_HOST}:{port}"
    token, config = gateway(tmp_path, controller, "gw-proxied", proxy.url(USER, SECRET))
    _, direct_config = gateway(tmp_path, controller, "gw-direct", None)
    state = tmp_path / "gw-proxied" / "state"

    direct = agent_cli("enroll", "--token", token, "--config", direct_config)
    assert direct.returncode == EXIT_UNAVAILABLE
    assert one_line(direct) == (f"outpost-agent: could not reach the controller at https://{target}/v1/ca (connection "
                                "refused); check the network and the address in the token, then try again")
    assert not proxy.heads and token.exists() and not (tmp_path / "gw-direct" / "state").exists()

    enrolled = agent_cli("enroll", "--token", token, "--config", config)
    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout.startswith("enrolled as spiffe://outpost.local/default/gw-proxied; certificate valid until ")
    assert proxy.carried == [target] * ENROLL_CONNECTIONS and not token.exists()
    identity = StateDir(state).load()

    renewed = agent_cli("renew", "--config", config)
    assert renewed.returncode == 0, renewed.stderr
    assert renewed.stdout.startswith("certificate renewed; valid until ")
    assert StateDir(state).load().cert_pem != identity.cert_pem
    assert proxy.carried == [target] * (ENROLL_CONNECTIONS + 2), "the controller's time, then the renewal"

    doctor = agent_cli("doctor", "--config", config)
    assert doctor.returncode == 0, doctor.stdout
    found = doctor_lines(doctor.stdout)
    assert found[f"proxy 127.0.0.1:{proxy.port}"] == (
        "ok", f"the proxy http://127.0.0.1:{proxy.port} (set in [link] proxy) carries the connections to {target}")
    assert found[target] == ("ok", f"outbound TCP and TLS to the controller and relay at {target} work through the "
                                   f"proxy http://127.0.0.1:{proxy.port}, and its certificate chains to the pinned CA")
    assert found["clock"][0] == "ok" and "the controller's" in found["clock"][1]
    assert found["certificate"][0] == "ok"

    assert SECRET not in shown(direct, enrolled, renewed, doctor)
    assert all(SECRET not in head for head in proxy.heads), "the password travels only as the CONNECT's Basic header"


def test_the_controllers_time_is_measured_through_the_proxy_with_the_pinned_check_on_the_tunnelled_tls(
        site, tmp_path: Path) -> None:
    controller, proxy = site
    token, config = gateway(tmp_path, controller, "gw-time", proxy.url(USER, SECRET))
    assert agent_cli("enroll", "--token", token, "--config", config).returncode == 0
    identity = StateDir(tmp_path / "gw-time" / "state").load()
    settings = ProxySettings(proxy.url(USER, SECRET))
    before = len(proxy.carried)

    sample = asyncio.run(fetch_controller_time(identity.controller_url, identity.ca_pem, proxy=settings))
    assert sample.source == "controller" and sample.origin == identity.controller_url
    assert abs(sample.offset) < 5 and len(proxy.carried) == before + 1
    with pytest.raises(ControllerUnreachable, match="connection refused"):
        asyncio.run(fetch_controller_time(identity.controller_url, identity.ca_pem))

    async def through_proxy_at(moment: float) -> None:
        tls = PinnedTLS(identity.ca_pem, FixedTime(moment), settings)
        async with tls.client(identity.controller_url, 10.0, "unreachable: {reason}") as channel:
            await channel.get(identity.controller_url + "/v1/ca", 16 * 1024)

    asyncio.run(through_proxy_at(identity.not_after().timestamp() - 60))  # valid then: passes
    with pytest.raises(TrustError, match="presented a certificate valid from .*: expired at the checked time"):
        asyncio.run(through_proxy_at(identity.not_after().timestamp() + 86400 * 400))


def test_the_running_agents_certificate_keeper_renews_through_the_proxy(site, tmp_path: Path) -> None:
    controller, proxy = site
    token, config = gateway(tmp_path, controller, "gw-keeper", proxy.url(USER, SECRET))
    assert agent_cli("enroll", "--token", token, "--config", config).returncode == 0
    state = StateDir(tmp_path / "gw-keeper" / "state")
    old = state.load().cert_pem
    keystore = open_keystore(state.path, KeyStoreSettings(backend="software"))
    before = len(proxy.carried)
    try:
        asyncio.run(CertificateKeeper(state, keystore, proxy=ProxySettings(proxy.url(USER, SECRET))).renew_now())
    finally:
        keystore.close()
    assert state.load().cert_pem != old and len(proxy.carried) == before + 1


def test_a_wrong_proxy_password_is_one_line_changes_nothing_and_the_token_still_enrolls(site, tmp_path: Path) -> None:
    controller, proxy = site
    target = f"{PROXY_ONLY_HOST}:{controller.url.rsplit(':', 1)[1]}"
    wrong = "not-" + SECRET
    token, config = gateway(tmp_path, controller, "gw-login", proxy.url(USER, wrong))
    state = tmp_path / "gw-login" / "state"
    refusal = (f"the proxy http://127.0.0.1:{proxy.port} refused to carry the connection to the controller at "
               f"https://{target} (HTTP 407); check the user and password in [link] proxy")
    text = token.read_text()

    refused = agent_cli("enroll", "--token", token, "--config", config)
    assert refused.returncode == EXIT_UNAVAILABLE and refused.stdout == ""
    assert one_line(refused) == f"outpost-agent: {refusal}"
    assert token.read_text() == text and not state.exists() and not proxy.carried

    doctor = agent_cli("doctor", "--config", config)
    assert doctor.returncode == 1
    found = doctor_lines(doctor.stdout)
    assert found[f"proxy 127.0.0.1:{proxy.port}"] == ("fail", refusal)
    assert found["pinned CA"] == ("fail", refusal)
    assert found[target] == ("skip", "no pinned CA to check TLS with")

    config.write_text(config.read_text().replace(wrong, SECRET))
    enrolled = agent_cli("enroll", "--token", token, "--config", config)
    assert enrolled.returncode == 0, enrolled.stderr
    cert = StateDir(state).load().cert_pem

    config.write_text(config.read_text().replace(SECRET, wrong))
    renewal = agent_cli("renew", "--config", config)
    assert renewal.returncode == EXIT_UNAVAILABLE
    assert one_line(renewal) == f"outpost-agent: {refusal}"
    assert StateDir(state).load().cert_pem == cert, "the certificate is kept"
    doctor = agent_cli("doctor", "--config", config)
    found = doctor_lines(doctor.stdout)
    assert found[f"proxy 127.0.0.1:{proxy.port}"] == ("fail", refusal)
    assert found[target] == ("skip", "not checked: the proxy did not carry the connection (see the proxy check)")

    assert wrong not in shown(refused, renewal, doctor) and SECRET not in shown(refused, enrolled, renewal, doctor)


def test_https_proxy_from_the_environment_carries_enrollment_and_no_proxy_sends_a_host_past_it(
        controller: Controller, tmp_path: Path) -> None:
    with proxy_in_thread() as proxy:
        env = {**python_env(), "HTTPS_PROXY": proxy.url()}
        tokens = []
        for name in ("gw-env", "gw-bypass"):
            token = tmp_path / f"{name}.token"
            controller.ctl("identity", "create", name, "--token-out", str(token))
            tokens.append(token)
        through = agent_cli("enroll", "--token", tokens[0], "--state", tmp_path / "env-state", "--keystore", "software",
                            env=env)
        config = tmp_path / "agent.toml"
        config.write_text(f'state_dir = "{tmp_path / "env-state"}"\n[keystore]\nbackend = "software"\n')
        doctored = agent_cli("doctor", "--config", config, env=env)
        carried = list(proxy.carried)
        bypass = {**env, "NO_PROXY": "localhost,127.0.0.1"}
        bypassed = agent_cli("enroll", "--token", tokens[1], "--state", tmp_path / "bypass-state",
                             "--keystore", "software", env=bypass)
        doctored_directly = agent_cli("doctor", "--config", config, env=bypass)
    assert through.returncode == 0 and bypassed.returncode == 0, through.stderr + bypassed.stderr
    port = controller.url.rsplit(":", 1)[1]
    assert carried[:ENROLL_CONNECTIONS] == [f"127.0.0.1:{port}"] * ENROLL_CONNECTIONS
    assert proxy.carried == carried, "NO_PROXY's host went straight to the controller"
    assert doctor_lines(doctored.stdout)[f"proxy 127.0.0.1:{proxy.port}"] == ("ok", (
        f"the proxy http://127.0.0.1:{proxy.port} (set in HTTPS_PROXY) carries the connections to 127.0.0.1:{port}; "
        "HTTPS_PROXY is this shell's: outpost-agent under systemd sees it only if its unit sets it, so set "
        "[link] proxy in the config file for the service"))
    direct = doctor_lines(doctored_directly.stdout)
    assert not any(name.startswith("proxy ") for name in direct)
    assert direct[f"127.0.0.1:{port}"] == ("ok", f"outbound TCP and TLS to the controller and relay at 127.0.0.1:{port} "
                                                 "work directly (127.0.0.1 is in no_proxy), and its certificate "
                                                 "chains to the pinned CA")


def test_a_proxy_that_cannot_be_reached_is_its_own_failing_line_with_the_fix(site, tmp_path: Path) -> None:
    controller, _ = site
    closed = free_port()
    token, config = gateway(tmp_path, controller, "gw-no-proxy", f"http://{USER}:{SECRET}@127.0.0.1:{closed}")
    sentence = (f"cannot reach the proxy http://127.0.0.1:{closed} (connection refused); check the proxy address in "
                "[link] proxy and that the proxy is running")

    enroll = agent_cli("enroll", "--token", token, "--config", config)
    doctor = agent_cli("doctor", "--config", config)

    assert enroll.returncode == EXIT_UNAVAILABLE and one_line(enroll) == f"outpost-agent: {sentence}"
    assert token.exists() and not (tmp_path / "gw-no-proxy" / "state").exists()
    assert doctor.returncode == 1 and doctor_lines(doctor.stdout)[f"proxy 127.0.0.1:{closed}"] == ("fail", sentence)
    assert SECRET not in shown(enroll, doctor)


def test_run_enrolls_and_keeps_its_tunnel_through_the_proxy_on_a_proxy_only_site(site, tmp_path: Path) -> None:
    controller, proxy = site
    port = int(controller.url.rsplit(":", 1)[1])
    _, config = gateway(tmp_path, controller, "gw-run", proxy.url(USER, SECRET))
    state = tmp_path / "gw-run" / "state"
    agent = Process([sys.executable, "-m", "agent", "run", "--config", str(config)])
    try:
        wait_until(lambda: read_status(state).get("state") == "connected", RUN_TIMEOUT, what="the tunnel up")
        status = read_status(state)
    finally:
        agent.stop()
    assert status["relay"] == f"wss://{PROXY_ONLY_HOST}:{port}/v1/tunnel"
    assert status["clock_source"] == "controller", "the clock was measured through the proxy too"
    # The tunnel ran on TLS with Outpost's ALPN inside the CONNECT, and nothing of the run loaded aiohttp.
    assert status["transport"] == "tls" and status["aiohttp_loaded"] is False
    # Enrollment's three, the clock at start, the tunnel; a renewal or clock refresh is hours away.
    assert proxy.carried == [f"{PROXY_ONLY_HOST}:{port}"] * (ENROLL_CONNECTIONS + 2)
    assert SECRET not in agent.output and SECRET not in (state / "status.json").read_text()
