"""``outpost-agent run``: the composition root, and the one event loop of the process.

``run`` starts the loop (uvloop where installed, unless the config says
``event_loop = "asyncio"``; shared.event_loop) and everything else happens in
it, in order: enroll from a token file if not enrolled, check the device key,
measure the clock, recover an expired certificate, then serve (the tunnel
supervisor, dials, the certificate and clock keepers) until a stop signal.
"""

from __future__ import annotations

import logging

from agent.clock.measure import keep_clock, measure_once
from agent.clock.trusted import TrustedClock
from agent.config import AgentConfig
from agent.errors import KeyStoreError
from agent.identity.keystore import KeyStore
from agent.identity.refusals import DISABLED, DisabledGate
from agent.identity.state import StateDir
from agent.proxy import DIRECT, ProxySettings
from agent.services.forward import DialListener
from agent.tunnel.backoff import Backoff
from agent.tunnel.client import TunnelCredentials, TunnelOptions
from agent.tunnel.link_profiles import LinkPlan, plan_from_settings
from agent.tunnel.report import Reporter, static_facts
from agent.tunnel.status import TunnelStats, clock_time, note_clock, report_offline
from agent.tunnel.supervisor import TunnelSupervisor, serve_agent
from shared import event_loop, service_manager

log = logging.getLogger(__name__)

#: How the sentence for a missing uvloop names the setting that asked for it.
EVENT_LOOP_SETTING = 'event_loop = "{}" in the agent config'


def options_for(plan: LinkPlan, binds: dict[str, tuple[str, int]] | None = None,
                proxy: ProxySettings = DIRECT, transport: str = "auto") -> TunnelOptions:
    """The tunnel options a link plan asks for, with the proxy every relay is reached through (or not)."""
    return TunnelOptions(limits=plan.limits, liveness=plan.liveness, binds=dict(binds or {}), proxy=proxy,
                         transport=transport)


def backoff_for(plan: LinkPlan) -> Backoff:
    """Reconnect delays within the plan's bounds (full jitter)."""
    return Backoff(initial=plan.reconnect_initial, cap=plan.reconnect_max, stable_after=plan.stable_after)


def check_device_key(keystore: KeyStore) -> None:
    """Sign once at start, so a lost key says so now rather than at the first login.

    A lost key or a refused authorization ends the agent here. A TPM that is
    busy or locked out does not: the tunnel loop tries again with its backoff
    (minutes apart), where a restart by systemd would ask every 10 s.
    """
    try:
        keystore.sign(b"outpost-agent start check")
    except KeyStoreError as error:
        if not error.retryable:
            raise
        log.warning("%s", error)


def run(config: AgentConfig) -> int:
    """Entry point of ``outpost-agent run``; returns the exit code."""
    return event_loop.run(run_agent(config), config.event_loop, setting=EVENT_LOOP_SETTING)


async def run_agent(config: AgentConfig) -> int:
    """Everything ``run`` does, on the running loop; returns the exit code."""
    log.info("running on the %s event loop", event_loop.running_loop_name())
    state = StateDir(config.state_dir)
    if not state.is_enrolled():
        from agent.enrollment.field import wait_for_enrollment

        if await wait_for_enrollment(config) is None:
            return 0  # stopped while waiting for a token
    else:
        tidy_enrolled(config, state)
    from agent.identity.select import open_keystore

    keystore = open_keystore(config.state_dir, config.keystore)
    try:
        check_device_key(keystore)
        await _serve_enrolled(config, state, keystore)
    finally:
        keystore.close()
    return 0


def tidy_enrolled(config: AgentConfig, state: StateDir) -> None:
    """Retire what enrollment left behind: a stop between storing the enrollment and retiring its token
    left the token; an enrollment by hand leaves a refused copy in the state directory."""
    from agent.enrollment.places import anything_left, token_paths

    if not anything_left(config):  # as on almost every start: the enrollment code stays unloaded
        return
    from agent.enrollment.field import load_refusals, remove_refused_copies, retire_redeemed_tokens

    retire_redeemed_tokens(token_paths(config), state.load())
    remove_refused_copies(config, load_refusals(config.state_dir).keys())


async def _serve_enrolled(config: AgentConfig, state: StateDir, keystore: KeyStore) -> None:
    from agent.identity.keeper import keeper_for_tunnel
    from agent.identity.recovery import recover_at_start

    identity = state.load()
    # Every decision below (expiry, renewal, the relay's certificate) runs on trusted time,
    # and every connection (clock, recovery, renewal, tunnels) takes the same proxy decision.
    clock = TrustedClock(config.clock)
    proxy = config.proxy
    clock_problem = await service_manager.watchdog_fed(
        measure_once(clock, identity.controller_url, identity.ca_pem, proxy))
    # One schedule of asks while the identity is disabled: recovery, tunnels and renewal share it.
    gate = DisabledGate()

    def disabled_at_start(why: str, wait: float) -> None:
        next_ask = clock.now() + wait
        stats = TunnelStats(state=DISABLED, last_error=why, next_ask=next_ask)
        note_clock(stats, clock, clock_problem)
        try:
            state.write_status(stats.as_json(clock.now()))
        except OSError as exc:
            log.warning("cannot write status: %s", exc)
        service_manager.notify_ready(f"disabled by central ops; asking again at {clock_time(next_ask)}")

    # A gateway offline past its certificate's expiry recovers before its first tunnel,
    # and is ready (waiting on the network) while the controller cannot be reached.
    if await service_manager.watchdog_fed(
            recover_at_start(state, keystore, clock, on_retry=report_offline, proxy=proxy, gate=gate,
                             on_disabled=disabled_at_start)):
        identity = state.load()
    credentials = TunnelCredentials(uri=identity.uri, chain_pem=[identity.cert_pem],
                                    ca_pem=identity.ca_pem, keystore=keystore)
    plan = plan_from_settings(config.link)
    binds = {b.service: (b.target_host, b.target_port) for b in config.binds}
    # A declared port is bound with its service and reached as SERVICE:PORT (agent/services/forward.py).
    binds.update({f"{b.service}:{declared}": (host, port) for b in config.binds for declared, host, port in b.ports})
    options = options_for(plan, binds=binds, proxy=proxy, transport=config.link.transport)
    # The controller's latest list (from AUTH_OK) beats the one enrollment stored.
    relays = state.load_relays() or identity.relays
    supervisor = TunnelSupervisor(relays, credentials, options, write_status=state.write_status,
                                  backoff=backoff_for(plan), save_relays=state.save_relays, gate=gate,
                                  prefer_relays=config.link.prefer_relays)
    supervisor.stats.link = plan.profile
    supervisor.reporter = Reporter(static_facts(identity.uri, plan.profile, plan.liveness.keepalive_interval,
                                                keystore.backend))
    supervisor.options.clock = clock
    note_clock(supervisor.stats, clock, clock_problem)
    dials = [DialListener(d.service, d.listen_host, d.listen_port, supervisor.current_session) for d in config.dials]
    keeper = keeper_for_tunnel(state, keystore, credentials, supervisor.stats, clock, proxy, gate=gate)
    clock_keeper = keep_clock(clock, identity.controller_url, identity.ca_pem,
                              lambda c, problem: note_clock(supervisor.stats, c, problem), proxy=proxy)
    await serve_agent(supervisor, dials, keeper, clock_keeper)
