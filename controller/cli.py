"""``outpost-controller serve``: flags in, a running controller out.

This is the edge: the only place that reads flags. A bad flag, an unusable
data directory or a busy port ends in one sentence on stderr and a non-zero
exit, with nothing half-created.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import shared.service_manager as service_manager
from controller.bootstrap import open_data_dir
from controller.errors import StartupError
from controller.names import NAME_PATTERN
from controller.settings import (
    DEFAULT_CERT_LIFETIME,
    DEFAULT_LISTEN_HOST,
    DEFAULT_LISTEN_PORT,
    DEFAULT_RECOVERY_GRACE,
    DEFAULT_TOKEN_TTL,
    DEFAULT_TRUST_DOMAIN,
    Settings,
)
from controller.tokens import MAX_TOKEN_TTL, MIN_TOKEN_TTL
from shared import __version__
from shared.errors import EXIT_USAGE, OutpostError

#: Certificates shorter than five minutes would be renewed faster than a slow
#: link completes a renewal; longer than 90 days defeats short-lived certificates.
MIN_CERT_LIFETIME = 300
MAX_CERT_LIFETIME = 90 * 24 * 3600
#: 0 turns recovery off (an expired gateway needs a new token); past a year a
#: lost gateway's key would stay good for too long.
MAX_RECOVERY_GRACE = 365 * 24 * 3600


class UsageError(StartupError):
    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one sentence, not argparse's usage dump
        raise UsageError(f"outpost-controller: {message}; see outpost-controller serve --help.")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {value!r} is not HOST:PORT (for example 127.0.0.1:8443 or [::1]:8443).")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port_text)


def parse_advertise(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--advertise {value!r} must be a base URL like https://controller.example:8443.")
    return value.rstrip("/")


def parse_san(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.lower().rstrip(".").split(".")
    if not all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels):
        raise UsageError(f"--san {value!r} is neither a DNS name nor an IP address.")
    return ".".join(labels)


def check_range(flag: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high} seconds, not {value}.")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outpost-controller", description="Outpost controller and relay.")
    parser.add_argument("--version", action="version", version=f"outpost-controller {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the controller, API and relay on one TLS listener")
    serve.add_argument("--data", required=True, help="data directory (created on first start)")
    serve.add_argument("--listen", default=f"{DEFAULT_LISTEN_HOST}:{DEFAULT_LISTEN_PORT}", help="HOST:PORT")
    serve.add_argument("--advertise", help="base URL agents use (default: from --listen)")
    serve.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    serve.add_argument("--cert-lifetime", type=int, default=DEFAULT_CERT_LIFETIME, help="seconds")
    serve.add_argument("--token-ttl", type=int, default=DEFAULT_TOKEN_TTL, help="seconds")
    serve.add_argument("--recovery-grace", type=int, default=DEFAULT_RECOVERY_GRACE,
                       help="seconds after expiry during which a gateway recovers with its enrolled key")
    serve.add_argument("--san", action="append", default=[], help="extra name for the listener certificate")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    host, port = parse_listen(args.listen)
    domain = args.trust_domain
    if not all(NAME_PATTERN.fullmatch(label) for label in domain.split(".")):
        raise UsageError(f"--trust-domain {domain!r} must be a DNS-style name such as outpost.example.")
    return Settings(
        data_dir=Path(args.data).absolute(),
        listen_host=host,
        listen_port=port,
        advertise_url=parse_advertise(args.advertise) if args.advertise else None,
        trust_domain=domain,
        cert_lifetime=check_range("--cert-lifetime", args.cert_lifetime, MIN_CERT_LIFETIME, MAX_CERT_LIFETIME),
        token_ttl=check_range("--token-ttl", args.token_ttl, MIN_TOKEN_TTL, MAX_TOKEN_TTL),
        recovery_grace=check_range("--recovery-grace", args.recovery_grace, 0, MAX_RECOVERY_GRACE),
        extra_sans=tuple(parse_san(name) for name in args.san),
    )


async def serve(settings: Settings) -> None:
    """Bind, open the data directory, serve until SIGTERM or SIGINT."""
    # Imported here so `--help` and flag errors work without loading the relay.
    from controller.server import ControllerServer, bind_listener

    listener = bind_listener(settings.listen_host, settings.listen_port)
    try:
        settings = settings.with_port(int(listener.getsockname()[1]))
        context = open_data_dir(settings)
    except BaseException:
        listener.close()
        raise
    server = ControllerServer(context, listener)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        print(
            f"outpost-controller ready on {settings.base_url} (CA {context.ca.fingerprint}; "
            f"outpostctl config: {settings.outpostctl_config_path})",
            flush=True,
        )
        await stop.wait()
    finally:
        await server.stop()
        context.close()


def main(argv: Sequence[str] | None = None) -> int:
    # The journal with structured fields under systemd (python3-systemd), stderr otherwise.
    service_manager.configure_logging(logging.INFO, identifier="outpost-controller")
    try:
        args = build_parser().parse_args(argv)
        settings = settings_from_args(args)
        asyncio.run(serve(settings))
    except OutpostError as error:
        print(str(error), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
