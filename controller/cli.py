"""``outpost-controller serve``: flags in, a running controller out.

This is the edge: the only place that reads flags. A bad flag, an unusable
data directory or a busy port ends in one sentence on stderr and a non-zero
exit, with nothing half-created.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import shared.service_manager as service_manager
from controller import audit_cli, store_move
from controller.admission import MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS
from controller.bootstrap import open_data_dir
from controller.errors import StartupError
from controller.listener import ListenerLimits
from controller.names import NAME_PATTERN
from controller.settings import (
    DEFAULT_CERT_LIFETIME,
    DEFAULT_LISTEN_HOST,
    DEFAULT_LISTEN_PORT,
    DEFAULT_RECOVERY_GRACE,
    DEFAULT_RELAY_CERT_LIFETIME,
    DEFAULT_TOKEN_TTL,
    DEFAULT_TRUST_DOMAIN,
    ROLES,
    Settings,
    host_port,
)
from controller.signin.config import SigninSettings, parse_config
from controller.tokens import MAX_TOKEN_TTL, MIN_TOKEN_TTL
from shared import __version__
from shared.errors import EXIT_USAGE, OutpostError
from shared.event_loop import EVENT_LOOPS, run, running_loop_name

#: Certificates shorter than five minutes would be renewed faster than a slow
#: link completes a renewal; longer than 90 days defeats short-lived certificates.
MIN_CERT_LIFETIME = 300
MAX_CERT_LIFETIME = 90 * 24 * 3600
#: A relay's certificate is how long a revoked relay is still trusted by gateways: a day at most.
MAX_RELAY_CERT_LIFETIME = 24 * 3600
#: 0 turns recovery off (an expired gateway needs a new token); past a year a
#: lost gateway's key would stay good for too long.
MAX_RECOVERY_GRACE = 365 * 24 * 3600
#: A cap below this would refuse a single site's gateways reconnecting together;
#: above a million the cap no longer bounds memory (each connection holds ~64 KiB).
MIN_CONNECTION_CAP = 1
MAX_CONNECTION_CAP = 1_000_000
#: What a ``--config`` file may set (each as its flag would).
#: The keys of a ``--config`` file: the store, and people's sign-in (controller/signin/config.py).
CONFIG_KEYS = frozenset({"store", "admin_credential", "signin"})
SIGNIN_KEYS = ("admin_credential", "signin")
#: Net allocations of tracked objects between two collections of the youngest generation (Python's
#: default is 700). An admission allocates ~120 that outlive it (fleet_scale: 1,663 young collections
#: for 10,000 admissions), so at 700 the objects of the admissions in flight were seen, and
#: promoted, by every young collection; a storm's spread-out handshakes live longer still. Each tenth
#: promotion round then triggers a full collection over every tunnel held: 11 at a 10,000 bring-up and
#: 15 in its storm, 0.4-0.7 ms of relay CPU per admission. At 7,000 (~60 admissions) most of an
#: admission's objects are freed before a collection sees them and full collections become rare,
#: while the youngest generation still stays a few hundred KiB.
COLLECT_AFTER_ALLOCATIONS = 7_000


class UsageError(StartupError):
    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one sentence, not argparse's usage dump
        raise UsageError(f"outpost-controller: {message}; see outpost-controller serve --help.")


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{flag} {value!r} is not HOST:PORT (for example 127.0.0.1:8443 or [::1]:8443).")
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


def check_range(flag: str, value: int, low: int, high: int, unit: str = "seconds") -> int:
    if not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high} {unit}, not {value}.")
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
    serve.add_argument("--relay-cert-lifetime", type=int, default=DEFAULT_RELAY_CERT_LIFETIME,
                       help="seconds a relay's certificate lasts (bounds how long gateways trust a revoked relay)")
    serve.add_argument("--token-ttl", type=int, default=DEFAULT_TOKEN_TTL, help="seconds")
    serve.add_argument("--recovery-grace", type=int, default=DEFAULT_RECOVERY_GRACE,
                       help="seconds after expiry during which a gateway recovers with its enrolled key")
    serve.add_argument("--san", action="append", default=[], help="extra name for the listener certificate")
    serve.add_argument("--api-listen", help="HOST:PORT of a listener for the management API alone "
                                            "(then /api/ is not served on --listen)")
    serve.add_argument("--metrics-listen", help="HOST:PORT of a listener for /metrics alone, for the bearer of "
                                                "DIR/metrics.token (default: no metrics)")
    serve.add_argument("--max-unauthenticated", type=int, default=MAX_UNAUTHENTICATED,
                       help="connections not yet authenticated, in total, per listener")
    serve.add_argument("--max-unauthenticated-per-address", type=int, default=MAX_UNAUTHENTICATED_PER_ADDRESS,
                       help="connections not yet authenticated from one source address")
    serve.add_argument("--store", help="postgresql://USER@HOST/DATABASE: a store shared by several controller "
                                       "processes (default: an SQLite file in the data directory)")
    serve.add_argument("--config", help="a TOML file with settings; a flag given on the command line wins "
                                        f"(keys: {', '.join(sorted(CONFIG_KEYS))}; identity providers in "
                                        "[[signin.provider]], docs/people.md)")
    serve.add_argument("--role", choices=ROLES, default="all",
                       help="all: controller and relay in one process (default); controller: enrollment, renewal "
                            "and the management API, no tunnels; relay: tunnels only, no CA key (docs/deployment.md)")
    serve.add_argument("--enroll-token", help="--role relay: the token file of outpostctl relay add, redeemed at "
                                              "the first start")
    serve.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                       help="auto: uvloop where installed (less memory per connection), else asyncio")
    admin = commands.add_parser("admin-token", help="the management API's admin credential")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, parser_class=_Parser)
    rotate = admin_commands.add_parser(
        "rotate", help="make a new admin token; the old one stops working at once, also in a running controller")
    rotate.add_argument("--data", required=True, help="the controller's data directory")
    rotate.add_argument("--out", help="where to write the new outpostctl.toml (default: DIR/outpostctl.toml)")
    rotate.add_argument("--url", help="the management API's URL for that file (default: from DIR/outpostctl.toml)")
    backup = commands.add_parser("backup", help="copy the data directory (CA, SQLite store) to a new directory, "
                                                "also while the controller runs")
    backup.add_argument("path", help="the backup directory to create")
    backup.add_argument("--data", required=True, help="the controller's data directory")
    restore = commands.add_parser("restore", help="make a data directory from a backup (then start serve on it)")
    restore.add_argument("path", help="a directory made by outpost-controller backup")
    restore.add_argument("--data", required=True, help="the data directory to create (absent or empty)")
    audit_cli.add_parser(commands)
    store_move.add_parser(commands)
    return parser


def read_config(path: str) -> dict[str, Any]:
    """The settings of a ``--config`` TOML file; one sentence for a file that cannot be used."""
    import tomllib

    try:
        config = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror}; give the path of a readable TOML file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path} is not valid TOML ({error}); fix the file.") from None
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise UsageError(f"--config {path}: unknown setting {unknown[0]!r}; the known ones are "
                         f"{', '.join(sorted(CONFIG_KEYS))}.")
    if "store" in config and not isinstance(config["store"], str):
        raise UsageError(f"--config {path}: store must be a string in quotes, like store = \"...\".")
    return config


def signin_settings(config: dict[str, Any], base: Path) -> SigninSettings:
    """People's sign-in from the ``--config`` file's ``admin_credential`` and ``[signin]``."""
    return parse_config({key: config[key] for key in SIGNIN_KEYS if key in config}, base)


def parse_store(value: str) -> str | Path:
    """A ``postgresql://`` URL libpq can read, or an existing SQLite store file; otherwise one sentence.

    A file is another process's store on this machine (a relay beside its
    controller, docs/deployment.md); nothing is opened or created here.
    """
    from controller.store import StoreLocationError, is_url

    if not is_url(value):
        path = Path(value)
        if path.is_absolute() and path.is_file():
            return path
        # Not echoed when it may hold a password (``USER:PASSWORD@HOST`` with the scheme forgotten).
        shown = "..." if "@" in value else repr(value)
        raise UsageError(f"--store {shown} is not a URL, nor an existing SQLite store file (an absolute path); "
                         "give postgresql://USER@HOST/DATABASE, the controller's DIR/store.sqlite3, or leave --store "
                         "out for the SQLite file in the data directory.")
    try:
        from controller.store_postgres import check_url
    except ImportError:
        raise StoreLocationError("--store postgresql://... needs psycopg 3: apt install python3-psycopg "
                                 "(or pip install 'outpost[postgresql]').") from None
    if not value.startswith(("postgresql://", "postgres://")):
        raise UsageError(f"--store {value.split(':', 1)[0]}://... is not a store this controller knows; "
                         "give a postgresql:// URL.")
    return check_url(value)


def store_setting(store: str | Path | None) -> dict[str, Any]:
    return {"store_file": store} if isinstance(store, Path) else {"store_url": store}


def settings_from_args(args: argparse.Namespace) -> Settings:
    config = read_config(args.config) if args.config else {}
    if args.enroll_token and args.role != "relay":
        raise UsageError("--enroll-token is for --role relay; leave it out.")
    if args.role == "relay" and args.api_listen:
        raise UsageError("--role relay serves no management API; leave --api-listen out (operators use a controller).")
    if args.role == "relay" and not (args.store or config.get("store")):
        raise UsageError("--role relay needs the controller's store: --store postgresql://... (or the controller's "
                         "DIR/store.sqlite3 on the same machine).")
    store = args.store if args.store is not None else config.get("store")
    host, port = parse_listen(args.listen)
    api_host, api_port = parse_listen(args.api_listen, "--api-listen") if args.api_listen else (None, None)
    if api_host is not None and (api_host, api_port) == (host, port) and port != 0:
        raise UsageError("--api-listen must differ from --listen; leave it out to serve the API on --listen.")
    metrics_host, metrics_port = (parse_listen(args.metrics_listen, "--metrics-listen") if args.metrics_listen
                                  else (None, None))
    if metrics_host is not None and metrics_port != 0 and (metrics_host, metrics_port) in ((host, port),
                                                                                          (api_host, api_port)):
        raise UsageError("--metrics-listen must differ from --listen and --api-listen: metrics have a listener "
                         "of their own.")
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
        relay_cert_lifetime=check_range("--relay-cert-lifetime", args.relay_cert_lifetime, MIN_CERT_LIFETIME,
                                        MAX_RELAY_CERT_LIFETIME),
        token_ttl=check_range("--token-ttl", args.token_ttl, MIN_TOKEN_TTL, MAX_TOKEN_TTL),
        recovery_grace=check_range("--recovery-grace", args.recovery_grace, 0, MAX_RECOVERY_GRACE),
        extra_sans=tuple(parse_san(name) for name in args.san),
        api_listen_host=api_host,
        api_listen_port=api_port,
        metrics_listen_host=metrics_host,
        metrics_listen_port=metrics_port,
        signin=signin_settings(config, Path(args.config).parent) if args.config else SigninSettings(),
        **store_setting(parse_store(store) if store else None),
        role=args.role,
        enroll_token=Path(args.enroll_token).absolute() if args.enroll_token else None,
        limits=dataclasses.replace(
            ListenerLimits(),
            max_unauthenticated=check_range("--max-unauthenticated", args.max_unauthenticated,
                                            MIN_CONNECTION_CAP, MAX_CONNECTION_CAP, "connections"),
            max_unauthenticated_per_address=check_range(
                "--max-unauthenticated-per-address", args.max_unauthenticated_per_address,
                MIN_CONNECTION_CAP, MAX_CONNECTION_CAP, "connections"),
        ),
    )


async def serve(settings: Settings) -> None:
    """Bind, open the data directory, serve until SIGTERM or SIGINT."""
    # Imported here so `--help` and flag errors work without loading the relay.
    from controller.server import ControllerServer, bind_listener

    listener = bind_listener(settings.listen_host, settings.listen_port)
    api_listener = None
    try:
        if settings.api_listen_host is not None:
            api_listener = bind_listener(settings.api_listen_host, settings.api_listen_port or 0, "--api-listen")
        settings = settings.with_port(
            int(listener.getsockname()[1]),
            int(api_listener.getsockname()[1]) if api_listener is not None else None,
        )
        relay_identity = None
        if settings.role == "relay":
            from controller.relay_node import open_relay

            context, relay_identity = open_relay(settings)
        else:
            context = open_data_dir(settings)
    except BaseException:
        listener.close()
        if api_listener is not None:
            api_listener.close()
        raise
    server = ControllerServer(context, listener, api_listener, relay_identity)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
        settle_collector()
        api = f"; management API on {settings.api_url}" if settings.separate_api else ""
        if server.metrics_port is not None:
            api += (f"; metrics on https://{host_port(settings.metrics_listen_host or '', server.metrics_port)}"
                    f"/metrics for the bearer of {settings.data_dir / 'metrics.token'}")
        if relay_identity is not None:
            print(f"outpost-controller ready on {settings.base_url} as relay {relay_identity.name} "
                  f"(gateways reach it at {relay_identity.address}; CA {context.ca.fingerprint})", flush=True)
        else:
            print(
                f"outpost-controller ready on {settings.base_url} (CA {context.ca.fingerprint}; "
                f"outpostctl config: {settings.outpostctl_config_path}){api}"
                + ("; no tunnels here (--role controller)" if settings.role == "controller" else ""),
                flush=True,
            )
        logging.getLogger(__name__).info("running on the %s event loop", running_loop_name())
        retired = loop.create_task(server.retired.wait())
        stopped = loop.create_task(stop.wait())
        await asyncio.wait((retired, stopped), return_when=asyncio.FIRST_COMPLETED)
        retired.cancel()
        stopped.cancel()
        # The process ends after this stop (exit_without_teardown): no collection of cycles during it.
        # The stop's own short-lived objects set off the collector every few hundred allocations,
        # 0.08-0.19 s of a stop of 5,000 tunnels (0.55-0.6 s of CPU); the exit frees what is left at once.
        gc.disable()
    finally:
        await server.stop()
        context.close()


def backup_or_restore(args: argparse.Namespace) -> int:
    from controller.backup import backup, restore

    data, path = Path(args.data).absolute(), Path(args.path).absolute()
    if args.command == "backup":
        with_store = backup(data, path)
        store = "its SQLite store" if with_store else "no store (back up PostgreSQL with pg_dump, docs/deployment.md)"
        print(f"backed up {data} to {path}: the CA, the listener certificate, the admin hash and {store}.")
    else:
        restore(path, data)
        print(f"restored {path} into {data}; start outpost-controller serve --data {data} "
              "(with the same --listen and --advertise, so agents find it).")
    return 0


def settle_collector() -> None:
    """Once serving: what start-up built stays out of every collection, and young collections are rarer.

    The modules, the CA, the listener's TLS contexts and the admission cache's
    rows live as long as the process; frozen, no full collection walks them
    again. Objects made afterwards are collected as before, only in larger batches
    (``COLLECT_AFTER_ALLOCATIONS``).
    """
    gc.freeze()
    gc.set_threshold(COLLECT_AFTER_ALLOCATIONS, *gc.get_threshold()[1:])


def exit_without_teardown() -> NoReturn:
    """End a stopped ``serve`` at once, without freeing its objects one by one.

    By now every tunnel was told to go, the store written and closed, and the
    listeners shut. What the interpreter's own exit would still do is free
    every object of the stopped tunnels, one at a time: 0.5 s of the 1.3 s a
    stop of 4,000 tunnels cost the event loop's thread (py-spy), all before
    systemd or an agent learns the process is gone. The worker jobs already
    started finish first, and the log handlers are flushed, as at a normal exit.
    """
    from controller.blocking import API_POOL, RELAY_POOL

    for pool in (API_POOL, RELAY_POOL):
        pool.finish()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone, or the stream closed: nothing to keep
            stream.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    # The journal with structured fields under systemd (python3-systemd), stderr otherwise.
    service_manager.configure_logging(logging.INFO, identifier="outpost-controller")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "admin-token":
            from controller.bootstrap import rotate_admin_token

            written = rotate_admin_token(Path(args.data).absolute(), Path(args.out).absolute() if args.out else None,
                                         args.url)
            print(f"a new admin token is in {written}; the old one no longer works. "
                  "Keep that file private: it is the only copy.")
            return 0
        if args.command in ("backup", "restore"):
            return backup_or_restore(args)
        if args.command == "audit":
            return audit_cli.run(args)
        if args.command == "store-move":
            return store_move.run(args)
        settings = settings_from_args(args)
        run(serve(settings), args.event_loop)
        exit_without_teardown()
    except OutpostError as error:
        print(str(error), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
