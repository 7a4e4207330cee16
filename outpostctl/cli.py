"""``outpostctl``: manage a fleet's identities, services and policies from a shell.

Every command reads the config once (see ``outpostctl.config`` for where it
looks), makes one or two calls to the management API and prints an aligned
table, or JSON with ``--json``. Expected failures print
``outpostctl: <sentence>`` on stderr and return a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent.errors import EXIT_USAGE
from outpostctl import audit_commands, commands, fleet, grants, policies, relays
from outpostctl.client import ManagementClient
from outpostctl.config import CONFIG_ENV_VAR, CtlConfig, find_config_file, load_config
from outpostctl.errors import OutpostError
from outpostctl.login import load_session, login, login_browser, logout, with_session
from shared import __version__

PROG = commands.PROG
DEFAULT_TENANT = "default"
#: Enough recent events to see what just happened without flooding a terminal.
#: The identity ``outpostctl connect`` dials as unless told otherwise.
DEFAULT_CONNECT_IDENTITY = "operator"
#: 128 + SIGINT, the shell's convention for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace, ManagementClient], int]


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than zero")
    return value


def _selectors(text: str) -> list[str]:
    selectors = [part.strip() for part in text.split(",")]
    if not all(selectors):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty selector; separate selectors with single commas")
    return selectors


# -- the parser --------------------------------------------------------------


def _config_options(*, suppress: bool) -> argparse.ArgumentParser:
    # Accepted before and after the command; under a command the default is
    # SUPPRESS so that a value given earlier is not overwritten by None.
    default = argparse.SUPPRESS if suppress else None
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", type=Path, metavar="FILE", default=default,
                         help=f"the outpostctl.toml to use (beats ${CONFIG_ENV_VAR} and --data)")
    options.add_argument("--data", type=Path, metavar="DIR", default=default,
                         help="a controller data directory; uses DIR/outpostctl.toml")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The full command line of ``outpostctl``."""
    parser = _Parser(prog=PROG, description="Manage an Outpost fleet through the controller's management API.",
                     parents=[_config_options(suppress=False)])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = _config_options(suppress=True)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, handler: Handler | None, help_text: str, *, json_flag: bool = False) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(handler=handler)
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sub

    def roles_and_tenant(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--role", dest="roles", action="append", default=[], metavar="ROLE",
                         help="a role (repeat for several)")
        sub.add_argument("--tenant", default=DEFAULT_TENANT, help=f"the tenant (default {DEFAULT_TENANT})")

    def tenant_filter(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tenant", default=None, help="only this tenant (default: all)")

    def tenant_of_name(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tenant", default=None, help=f"the identity's tenant (default {DEFAULT_TENANT})")

    def token_out(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--token-out", type=Path, required=True, metavar="FILE",
                         help="where to write the one-time enrollment token (mode 0600)")
        sub.add_argument("--force", action="store_true", help="replace FILE if it exists")
        sub.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="token lifetime (controller default: 7 days)")

    identity = top.add_parser("identity", help="gateway and operator identities").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    sub = leaf(identity, "create", commands.identity_create, "create an identity and write its enrollment token")
    sub.add_argument("name", metavar="NAME")
    roles_and_tenant(sub)
    token_out(sub)
    sub = leaf(identity, "list", fleet.identity_list, "list identities with presence, last seen and health",
               json_flag=True)
    tenant_filter(sub)
    fleet.add_filters(sub)
    for name, handler, help_text in (
        ("show", commands.names_an_identity(fleet.identity_show), "show one identity, its presence and its report"),
        ("revoke", commands.identity_revoke, "revoke an identity: close its tunnels, refuse renewal"),
        ("disable", commands.identity_disable, "disable an identity until enabled: close its tunnels, refuse renewal"),
        ("enable", commands.identity_enable, "enable a disabled identity again (never a revoked one)"),
    ):
        sub = leaf(identity, name, handler, help_text, json_flag=True)
        sub.add_argument("name", metavar="NAME")
        tenant_of_name(sub)
    sub = leaf(identity, "token", commands.identity_token, "write a new one-time enrollment token for an identity")
    sub.add_argument("name", metavar="NAME")
    tenant_of_name(sub)
    token_out(sub)

    service = top.add_parser("service", help="named services gateways bind and dial").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    sub = leaf(service, "create", commands.service_create, "create a service", json_flag=True)
    sub.add_argument("name", metavar="NAME")
    roles_and_tenant(sub)
    sub.add_argument("--choose", choices=["one", "any"], default="one",
                     help="a plain dial with several gateways bound: refuse with the choices (one, the default; "
                          "dial NAME@GATEWAY) or take any of them (any)")
    sub.add_argument("--port", dest="ports", action="append", type=int, default=[], metavar="PORT",
                     help="a port the service declares (repeat for each); dialed as NAME:PORT, mapped by [[bind]] ports")
    tenant_filter(leaf(service, "list", commands.service_list, "list services", json_flag=True))

    policy = top.add_parser("policy", help="who may dial or bind what (deny by default)").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    policies.add_commands(policy, leaf, _selectors, DEFAULT_TENANT)
    sub = leaf(policy, "explain", fleet.policy_explain,
               "say whether IDENTITY may dial or bind SERVICE, and which policies decide it", json_flag=True)
    sub.add_argument("identity", metavar="IDENTITY", help="NAME (tenant default) or TENANT/NAME")
    sub.add_argument("service", metavar="SERVICE", help="NAME (the identity's tenant) or TENANT/NAME")
    sub.add_argument("--kind", choices=["dial", "bind"], default=None, help="only this action (default: both)")
    sub.add_argument("--session", action="store_true",
                     help="as with a session certificate (outpostctl connect), which may dial but never bind")

    grants.add_commands(top, leaf)
    audit_commands.add_commands(top, leaf, _positive_int)
    relays.add_commands(top, leaf)
    leaf(top, "status", commands.status, "show the controller and connected tunnels", json_flag=True)

    sub = leaf(top, "connect", None, "expose a remote service as a local port")
    sub.add_argument("service", metavar="SERVICE", help="NAME (the identity's tenant) or TENANT/NAME")
    sub.add_argument("--listen", required=True, metavar="HOST:PORT", help="the local address to listen on")
    sub.add_argument("--as", dest="as_identity", default=None, metavar="IDENTITY",
                     help="the identity to dial as, NAME or TENANT/NAME (default: yourself when signed in, "
                          f"else {DEFAULT_CONNECT_IDENTITY})")
    sub = leaf(top, "login", None, "sign in as yourself through the identity provider (device code)")
    sub.add_argument("--provider", metavar="NAME", help="which identity provider, when the controller trusts several")
    sub.add_argument("--browser", action="store_true",
                     help="sign in with a browser on this machine (code flow with PKCE) instead of a device code")
    leaf(top, "logout", None, "end your session, on the controller too")
    leaf(top, "whoami", commands.whoami, "who the controller takes you for, and your roles", json_flag=True)
    sub = leaf(top, "quickstart", None, "run a controller, an agent and a demo service on this machine")
    sub.add_argument("--once", action="store_true", help="check the whole path once, then stop")
    sub.add_argument("--dir", type=Path, metavar="DIR", help="where to keep the quickstart's state")
    return parser


def read_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> CtlConfig:
    """The config the command line, the environment and the usual places point at."""
    env = dict(os.environ) if environ is None else environ
    home = Path(env["HOME"]) if env.get("HOME") else None
    path = find_config_file(config_flag=getattr(args, "config", None), data_flag=getattr(args, "data", None),
                            environ=env, cwd=Path.cwd(), home=home)
    return load_config(path)


def connect_identity(flag: str | None, session: dict[str, Any] | None) -> str:
    """``--as``, else the signed-in person, else the shared ``operator`` identity."""
    if flag is not None:
        return flag
    return f"{session['tenant']}/{session['name']}" if session else DEFAULT_CONNECT_IDENTITY


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "quickstart":
        from outpostctl.quickstart import run as run_quickstart
        return run_quickstart(args)
    config = read_config(args)
    if args.command == "login":
        (login_browser if args.browser else login)(ManagementClient(config), config, os.environ, args.provider)
        return 0
    if args.command == "logout":
        return logout(config, os.environ)
    session = load_session(config, os.environ)
    if session is not None:
        # Signed in: the person acts as themselves, never with the admin token beside it.
        config = with_session(config, os.environ)
    if args.command == "connect":
        from outpostctl.connect import run as run_connect
        args.as_identity = connect_identity(args.as_identity, session)
        return run_connect(args, config)
    code: int = args.handler(args, ManagementClient(config))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``outpostctl`` command; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        # --help and usage errors: argparse has printed; hand back its code.
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return _dispatch(args)
    except OutpostError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (``| head``) left; point stdout at /dev/null so the
        # interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
