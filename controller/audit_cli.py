"""``outpost-controller audit verify``: the hash chain checked offline, from the store and the key directly.

It needs no running controller and trusts none: it opens the store read-only
and reads the key from the data directory, so an operator can check a copy
of both taken off a machine they no longer trust.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

from controller.audit_chain import KEY_FILE, parse_checkpoint, read_key, rows_of, verify
from controller.errors import ControllerError, StartupError
from controller.settings import STORE_FILE
from controller.store import Parameters, StoreLocationError, StoreUnreachable

#: The exit code when the chain is broken: EX_DATAERR, the input data was wrong.
EXIT_CHAIN_BROKEN = 65


class ReadOnlyStore:
    """The store file opened read-only: verifying changes nothing, not even the schema."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise StartupError(f"There is no store at {path}; give the controller's data directory as --data.")
        self._connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self._connection.row_factory = sqlite3.Row

    def query(self, sql: str, parameters: Parameters = ()) -> list[Any]:
        try:
            return list(self._connection.execute(sql, parameters))
        except sqlite3.OperationalError as error:
            if "no such column" in str(error):
                raise StartupError("This store has no audit chain yet; start the controller on it once.") from None
            raise

    def close(self) -> None:
        self._connection.close()


class ReadOnlyPostgres:
    """A PostgreSQL store read in read-only transactions: verifying writes nothing there either."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg

            from controller.store_postgres import check_url, connection_string
            from controller.store_postgres_sql import row_factory, safe_url
        except ImportError:
            raise StoreLocationError("--store postgresql://... needs psycopg 3: apt install python3-psycopg "
                                     "(or pip install 'outpost[postgresql]').") from None
        from controller.store_postgres_sql import adapt, query_bytes

        self._adapt, self._query_bytes = adapt, query_bytes
        try:
            self._connection = psycopg.connect(connection_string(check_url(url)), autocommit=True,
                                               row_factory=row_factory)
            self._connection.execute("SET default_transaction_read_only = on")
        except psycopg.OperationalError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StoreUnreachable(f"Cannot reach the store {safe_url(url)} ({reason}); check --store and that "
                                   "PostgreSQL is running.") from None

    def query(self, sql: str, parameters: Parameters = ()) -> list[Any]:
        return list(self._connection.execute(self._query_bytes(sql), self._adapt(parameters)).fetchall())

    def close(self) -> None:
        self._connection.close()


def add_parser(commands: Any) -> None:
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    check = audit.add_parser("verify", help="check the audit hash chain offline (store and key read directly)")
    check.add_argument("--data", required=True, help="the controller's data directory (store and audit.key)")
    check.add_argument("--store", help="postgresql://USER@HOST/DATABASE: the store is there, not in --data "
                                       "(audit.key is still read from --data)")
    check.add_argument("--checkpoint", action="append", default=[], metavar="ID:MAC",
                       help="a chain head the controller logged (repeatable): a rewrite since is found")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    """Verify; print one line (or JSON); 0 when the chain is whole, EXIT_CHAIN_BROKEN otherwise."""
    data = Path(args.data).absolute()
    try:
        checkpoints = [parse_checkpoint(text) for text in args.checkpoint]
    except ControllerError as error:
        raise StartupError(error.message) from None
    key = read_key(data / KEY_FILE)
    if args.store and not str(args.store).startswith(("postgresql://", "postgres://")):
        raise StoreLocationError(f"--store {args.store!r} is not a postgresql:// URL; leave --store out for the "
                                 "SQLite store in --data.")
    store: ReadOnlyStore | ReadOnlyPostgres = ReadOnlyPostgres(args.store) if args.store else ReadOnlyStore(
        data / STORE_FILE)
    try:
        result = verify(rows_of(store), key, checkpoints)
    finally:
        store.close()
    print(json.dumps(result.to_json(), sort_keys=True) if args.json else result.summary())
    return 0 if result.ok else EXIT_CHAIN_BROKEN
