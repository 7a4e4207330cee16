"""``outpost-agent``: enroll, run, status and doctor.

This is the edge: the only place that reads the config file, flags and the
clock for the user. Every expected failure is printed as one line,
``outpost-agent: <sentence>``, and the process exits with the error's code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn

from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR, AgentConfig, with_environment_proxy
from agent.config_file import load_config
from agent.errors import EXIT_USAGE, OutpostError
from agent.identity.select import BACKENDS
from agent.identity.state import StateDir
from agent.status_view import format_status, status_report
from shared import __version__
from shared.utc import format_utc

if TYPE_CHECKING:
    import argparse

PROG = "outpost-agent"
#: Exit code for Ctrl-C, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    # Imported here: argparse checks each option with a help formatter, which imports shutil, bz2 and lzma
    # (0.7 MiB that the daemon would keep for its whole life); ``run`` as systemd starts it needs none of it.
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse that reports usage mistakes the way every other error is reported."""

        def error(self, message: str) -> NoReturn:
            print(f"{PROG}: {message}; see '{PROG} --help'", file=sys.stderr)
            sys.exit(EXIT_USAGE)

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


def daemon_arguments(argv: Sequence[str]) -> SimpleNamespace | None:
    """``run``, ``run --config FILE`` or ``run --config=FILE`` (how the service unit starts the agent), read
    without argparse; None for anything else, which the full parser reads (and explains when wrong)."""
    if not argv or argv[0] != "run":
        return None
    rest = list(argv[1:])
    if not rest:
        return SimpleNamespace(command="run", config=DEFAULT_CONFIG_PATH)
    if len(rest) == 1 and rest[0].startswith("--config="):
        value = rest[0].partition("=")[2]
    elif len(rest) == 2 and rest[0] == "--config":
        value = rest[1]
    else:
        return None
    if not value or value.startswith("-"):
        return None  # argparse says what is wrong with it
    return SimpleNamespace(command="run", config=Path(value))


def main(argv: Sequence[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args: Any = daemon_arguments(given) or build_parser().parse_args(given)
    try:
        if args.command == "enroll":
            return cmd_enroll(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "renew":
            return cmd_renew(args)
        if args.command == "doctor":
            from agent.doctor.checks import main as doctor

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


if __name__ == "__main__":
    sys.exit(main())
