"""``outpost-agent``: enroll, run, status and doctor.

This is the edge: the only place that reads the config file, flags and the
clock for the user. Every expected failure is printed as one line,
``outpost-agent: <sentence>``, and the process exits with the error's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, AgentConfig, load_config
from agent.errors import EXIT_USAGE, ConfigError, OutpostError
from agent.identity.select import BACKENDS, KeyStoreSettings
from agent.identity.state import EnrolledIdentity, StateDir

PROG = "outpost-agent"
#: Exit code for Ctrl-C, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes the way every other error is reported."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message}; see '{PROG} --help'", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Outpost gateway agent")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    enroll = commands.add_parser("enroll", help="enroll this gateway from a one-time token file")
    enroll.add_argument("--token", required=True, type=Path, metavar="FILE", help="the token file from central ops")
    enroll.add_argument("--state", type=Path, metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    enroll.add_argument("--keystore", choices=BACKENDS, help="where the device key lives (default auto)")
    enroll.add_argument("--config", type=Path, metavar="FILE", help="agent config file for state_dir and [keystore]")

    renew = commands.add_parser("renew", help="renew (or recover an expired) certificate now with the enrolled key")
    renew.add_argument("--state", type=Path, metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    renew.add_argument("--config", type=Path, metavar="FILE", help="agent config file for state_dir and [keystore]")

    run = commands.add_parser("run", help="keep the tunnel up and serve binds and dials")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="FILE",
                     help=f"agent config file (default {DEFAULT_CONFIG_PATH})")

    doctor = commands.add_parser("doctor", help="check network, DNS, clock, TPM, certificate and token file")
    doctor.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="FILE",
                        help=f"agent config file (default {DEFAULT_CONFIG_PATH})")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")

    status = commands.add_parser("status", help="show identity, certificate and tunnel status")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--state", type=Path, metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    where.add_argument("--config", type=Path, metavar="FILE", help="read state_dir from this config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "enroll":
            return cmd_enroll(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "renew":
            return cmd_renew(args)
        if args.command == "doctor":
            from agent.doctor import main as doctor

            return doctor(args.config, args.json)
        return cmd_status(args)
    except OutpostError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.enrollment.enroll import enroll

    config = load_config(args.config) if args.config else AgentConfig()
    state_dir = args.state or config.state_dir
    settings = config.keystore
    if args.keystore:
        settings = dataclasses.replace(settings, backend=args.keystore)
    from agent.clock.trusted import NOTABLE_OFFSET, TrustedClock

    # The token's expiry and the controller's certificate are judged by trusted time, not this clock alone.
    clock = TrustedClock(config.clock)
    identity = enroll(args.token, state_dir, settings, clock=clock)
    print(
        f"enrolled as {identity.uri}; certificate valid until {_utc(identity.not_after())}; "
        f"key in {identity.key_backend}"
    )
    if clock.measured and (abs(clock.offset) >= NOTABLE_OFFSET or clock.estimate.note):
        print(clock.report())
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    import asyncio

    from agent.identity.renewal import renew_certificate
    from agent.identity.select import open_keystore

    config = load_config(args.config) if args.config else AgentConfig()
    state = StateDir(args.state or config.state_dir)
    state.load()  # not enrolled: say so before touching the key store
    keystore = open_keystore(state.path, config.keystore)
    try:
        cert = asyncio.run(renew_certificate(state, keystore, time.time))
    finally:
        keystore.close()
    from agent.identity.trust import cert_not_after

    print(f"certificate renewed; valid until {_utc(cert_not_after(cert))}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = with_environment_proxy(load_config(args.config), os.environ)
    from agent.service_manager import configure_logging

    configure_logging(config.log_level.upper())
    from agent.tunnel.runner import run

    return run(config)


def with_environment_proxy(config: AgentConfig, env: Mapping[str, str]) -> AgentConfig:
    """``config`` with HTTPS_PROXY and NO_PROXY filling in what ``[link]`` leaves unset (agent.tunnel.proxy)."""
    from agent.tunnel.proxy import environment_proxy

    try:
        proxy, no_proxy = environment_proxy(config.link.proxy, config.link.no_proxy, env)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (proxy, no_proxy) == (config.link.proxy, config.link.no_proxy):
        return config
    return dataclasses.replace(config, link=dataclasses.replace(config.link, proxy=proxy, no_proxy=no_proxy))


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = args.state or (load_config(args.config).state_dir if args.config else DEFAULT_STATE_DIR)
    state = StateDir(state_dir)
    identity = state.load()
    report = status_report(identity, state.read_status(), time.time())
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_status(report))
    return 0


def status_report(identity: EnrolledIdentity, live: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """What ``status`` shows, as plain data (the ``--json`` output)."""
    not_after = identity.not_after()
    offset = live.get("clock_offset_s") if isinstance(live, dict) else None
    if isinstance(offset, (int, float)) and not isinstance(offset, bool):
        now += offset  # the agent's trusted time, not this clock alone
    return {
        "identity": identity.uri,
        "name": identity.name,
        "tenant": identity.tenant,
        "controller": identity.controller_url,
        "relays": list(identity.relays),
        "key_backend": identity.key_backend,
        "enrolled_at": identity.enrolled_at,
        "cert_not_after": not_after.timestamp(),
        "cert_expired": not_after.timestamp() <= now,
        "clock": _clock_sentence(live, now - (offset if isinstance(offset, (int, float)) else 0.0)),
        "tunnel": live,
    }


def _clock_sentence(live: dict[str, Any] | None, local_now: float) -> str | None:
    """The plain sentence about the agent's clock from status.json, or None before it measured."""
    from agent.clock.trusted import describe_offset

    if not isinstance(live, dict) or not isinstance(live.get("clock_source"), str):
        return None
    offset = live.get("clock_offset_s")
    sentence = describe_offset(offset if isinstance(offset, (int, float)) else 0.0, local_now, live["clock_source"])
    problem = live.get("clock_problem")
    return f"{sentence}; {problem}" if isinstance(problem, str) and problem else sentence


def format_status(report: dict[str, Any]) -> str:
    """The human-readable ``status`` text."""
    expiry = _utc_from(report["cert_not_after"])
    lines = [
        f"identity:    {report['identity']}",
        f"tenant:      {report['tenant']}",
        f"controller:  {report['controller']}",
        f"key:         {report['key_backend']}",
        f"certificate: valid until {expiry}" + (" (EXPIRED)" if report["cert_expired"] else ""),
    ]
    if report.get("clock"):
        lines.append(f"clock:       {report['clock']}")
    live = report["tunnel"]
    if live is None:
        lines.append("tunnel:      no status yet (is outpost-agent run active?)")
        return "\n".join(lines)
    lines.extend(_tunnel_lines(live))
    return "\n".join(lines)


# Keys of status.json (written by agent.tunnel.runner) shown with their own wording.
_STATUS_SHOWN = {"state", "relay", "connected_since", "rtt_ms", "bytes_in", "bytes_out", "updated",
                 "clock_offset_s", "clock_source", "clock_problem"}


def _tunnel_lines(live: dict[str, Any]) -> list[str]:
    lines = [f"tunnel:      {live.get('state', 'unknown')}"]
    if live.get("relay"):
        lines.append(f"relay:       {live['relay']}")
    if isinstance(live.get("connected_since"), (int, float)):
        lines.append(f"connected:   since {_utc_from(live['connected_since'])}")
    if isinstance(live.get("rtt_ms"), (int, float)):
        lines.append(f"rtt:         {live['rtt_ms']:.0f} ms")
    if "bytes_in" in live or "bytes_out" in live:
        lines.append(f"bytes:       in {live.get('bytes_in', 0)}, out {live.get('bytes_out', 0)}")
    for key in sorted(set(live) - _STATUS_SHOWN):
        value = live[key]
        if value in (None, [], {}):
            continue
        lines.append(f"{key.replace('_', ' ') + ':':<12} {_plain(value)}")
    if isinstance(live.get("updated"), (int, float)):
        lines.append(f"updated:     {_utc_from(live['updated'])}")
    return lines


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def _utc_from(timestamp: float) -> str:
    return _utc(datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc))


def _utc(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    sys.exit(main())
