"""``outpost-agent``: enroll, run, status and doctor.

This is the edge: the only place that reads the config file, flags and the
clock for the user. Every expected failure is printed as one line,
``outpost-agent: <sentence>``, and the process exits with the error's code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, AgentConfig, load_config, with_environment_proxy
from agent.errors import EXIT_USAGE, OutpostError
from agent.identity.select import BACKENDS
from agent.identity.state import EnrolledIdentity, StateDir
from agent.tunnel.status import clock_time as _utc_clock
from shared import __version__
from shared.utc import format_utc

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
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    enroll = commands.add_parser("enroll", help="enroll this gateway from a one-time token file")
    enroll.add_argument("--token", required=True, type=Path, metavar="FILE", help="the token file from central ops")
    enroll.add_argument("--state", type=Path, metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    enroll.add_argument("--keystore", choices=BACKENDS, help="where the device key lives (default auto)")
    enroll.add_argument("--config", type=Path, metavar="FILE",
                        help="agent config file for state_dir, [keystore], [clock] and the proxy")

    renew = commands.add_parser("renew", help="renew (or recover an expired) certificate now with the enrolled key")
    renew.add_argument("--state", type=Path, metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    renew.add_argument("--config", type=Path, metavar="FILE",
                       help="agent config file for state_dir, [keystore], [clock] and the proxy")

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

            return doctor(args.config, args.json, os.environ)
        return cmd_status(args)
    except OutpostError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``status | head -1``): what it wanted it has; leave quietly.
        _silence_stdout()
        return 0
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """Flush what every command printed here, not at interpreter exit, where a closed pipe
    would print a traceback-like "Exception ignored" (``doctor | head -1`` too)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except (OSError, ValueError):
        pass  # stdout closed or gone: nothing more to say, and nowhere to say it


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what the closed pipe
    did not take raises nothing at exit (the Python documentation's advice for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.clock.trusted import TrustedClock
    from agent.enrollment.enroll import enroll

    config = _config_for_command(args.config)
    state_dir = args.state or config.state_dir
    settings = config.keystore
    if args.keystore:
        settings = dataclasses.replace(settings, backend=args.keystore)
    # The token's expiry and the controller's certificate are judged by trusted time, not this clock alone.
    clock = TrustedClock(config.clock)
    identity = enroll(args.token, state_dir, settings, clock=clock, proxy=config.proxy)
    print(
        f"enrolled as {identity.uri}; certificate valid until {format_utc(identity.not_after().timestamp())}; "
        f"key in {identity.key_backend}"
    )
    _retire_used_token(args.token)
    _say_if_clock_off(clock)
    return 0


def _config_for_command(path: Path | None) -> AgentConfig:
    """The config file (or the defaults) with the environment's proxy where the file names none, as ``run`` has it."""
    return with_environment_proxy(load_config(path) if path else AgentConfig(), os.environ)


def _retire_used_token(given: Path) -> None:
    """Retire the redeemed token as field enrollment does, and say what became of it; never fails."""
    from agent.enrollment.field import USED_SUFFIX, retire_token

    # The file itself, not a link to it (--token /dev/stdin < FILE must not delete /dev/stdin).
    token = given.resolve()
    if not token.is_file():
        print(f"the token came from {given}, which is not a file; nothing to delete")
        return
    problem = retire_token(token)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
    elif token.with_name(token.name + USED_SUFFIX).exists():
        print(f"token file {token} renamed to {token.name}{USED_SUFFIX}: a token enrolls once")
    else:
        print(f"token file {token} deleted: a token enrolls once")


def cmd_renew(args: argparse.Namespace) -> int:
    import asyncio

    from agent.clock.measure import refresh_clock
    from agent.clock.trusted import TrustedClock
    from agent.identity.renewal import renew_certificate
    from agent.identity.select import open_keystore
    from shared.trust import cert_not_after

    config = _config_for_command(args.config)
    state = StateDir(args.state or config.state_dir)
    identity = state.load()  # not enrolled: say so before touching the key store
    clock = TrustedClock(config.clock)

    async def measure_and_renew() -> Any:
        # As in ``run``: the controller's certificate and the new one are judged by trusted time.
        await refresh_clock(clock, identity.controller_url, identity.ca_pem, config.proxy)
        return await renew_certificate(state, keystore, clock, config.proxy)

    keystore = open_keystore(state.path, config.keystore)
    try:
        cert = asyncio.run(measure_and_renew())
    finally:
        keystore.close()
    print(f"certificate renewed; valid until {format_utc(cert_not_after(cert).timestamp())}")
    _say_if_clock_off(clock)
    return 0


def _say_if_clock_off(clock: Any) -> None:
    """Print the clock sentence when the measured clock is notably off (the command still worked)."""
    from agent.clock.trusted import NOTABLE_OFFSET

    if clock.measured and (abs(clock.offset) >= NOTABLE_OFFSET or clock.estimate.note):
        print(clock.report())


def cmd_run(args: argparse.Namespace) -> int:
    config = _config_for_command(args.config)
    from shared.service_manager import configure_logging

    configure_logging(config.log_level.upper())
    from agent.tunnel.runner import run

    return run(config)


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
        "now": now,
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
    """The human-readable ``status`` text; times in UTC, with how far they are from trusted now."""
    now = report["now"]
    expiry = _when(report["cert_not_after"], now)
    lines = [
        f"identity:    {report['identity']}",
        f"tenant:      {report['tenant']}",
        f"controller:  {report['controller']}",
        f"key:         {report['key_backend']}",
        f"certificate: valid until {expiry}" + (" (EXPIRED)" if report["cert_expired"] else ""),
    ]
    live = report["tunnel"]
    if isinstance(live, dict):
        lines.extend(_renewal_lines(live, now))
    if report.get("clock"):
        lines.append(f"clock:       {report['clock']}")
    if live is None:
        lines.append("tunnel:      no status yet (is outpost-agent run active?)")
        return "\n".join(lines)
    lines.extend(_tunnel_lines(live, now))
    return "\n".join(lines)


def _renewal_lines(live: dict[str, Any], now: float) -> list[str]:
    lines = []
    if _is_number(live.get("next_renewal")):
        lines.append(f"next renewal: {_when(live['next_renewal'], now)}")
    if isinstance(live.get("renewal_error"), str) and live["renewal_error"]:
        lines.append(f"renewal:     the last attempt failed: {live['renewal_error']}")
    return lines


# Keys of status.json (written by agent.tunnel.supervisor) shown with their own wording.
_STATUS_SHOWN = {"state", "relay", "connected_since", "down_since", "rtt_ms", "bytes_in", "bytes_out", "updated",
                 "clock_offset_s", "clock_source", "clock_problem", "cert_not_after", "next_renewal",
                 "renewal_error", "next_ask"}


def _tunnel_lines(live: dict[str, Any], now: float) -> list[str]:
    state = live.get("state", "unknown")
    if state == "disabled" and _is_number(live.get("next_ask")):
        ask = live["next_ask"]
        lines = [f"tunnel:      disabled by central ops; asking again at {_utc_clock(ask)} ({_relative(ask - now)})"]
    else:
        lines = [f"tunnel:      {state}"]
    if live.get("relay"):
        lines.append(f"relay:       {live['relay']}")
    # Only a tunnel that is up has been connected since some time; an agent from before
    # down_since left connected_since of a tunnel that was gone, which must not be shown as current.
    if state == "connected" and _is_number(live.get("connected_since")):
        lines.append(f"connected:   since {_when(live['connected_since'], now)}")
    elif state != "connected" and _is_number(live.get("down_since")):
        lines.append(f"down:        since {_when(live['down_since'], now)}")
    if isinstance(live.get("rtt_ms"), (int, float)):
        lines.append(f"rtt:         {live['rtt_ms']:.0f} ms")
    if "bytes_in" in live or "bytes_out" in live:
        lines.append(f"bytes:       in {live.get('bytes_in', 0)}, out {live.get('bytes_out', 0)}")
    for key in sorted(set(live) - _STATUS_SHOWN):
        value = live[key]
        if value in (None, [], {}):
            continue
        lines.append(f"{key.replace('_', ' ') + ':':<12} {_plain(value)}")
    if _is_number(live.get("updated")):
        lines.append(f"updated:     {_when(live['updated'], now)}")
    return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _when(timestamp: float, now: float) -> str:
    """``2026-11-22 14:05 UTC (in 5 h 12 min)`` or ``(3 min ago)``, relative to trusted ``now``."""
    return f"{format_utc(timestamp)} ({_relative(timestamp - now)})"


def _relative(seconds: float) -> str:
    # Truncated, not rounded: a certificate with 23 h 59.9 min left does not yet have "1 d".
    span = int(abs(seconds))
    if span < 60:
        text = f"{span} s"
    elif span < 3600:
        text = f"{span // 60} min"
    elif span < 86400:
        text = f"{span // 3600} h {span % 3600 // 60} min"
    else:
        text = f"{span // 86400} d {span % 86400 // 3600} h"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
