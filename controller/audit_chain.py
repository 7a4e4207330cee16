"""The audit trail as a keyed hash chain: an edit, deletion, insertion or reordering of the store is found.

Each row carries ``mac`` = HMAC-SHA256(key, previous row's MAC, its own id,
time, event, fields), computed inside the transaction that inserts it (the
write lock is held, so several processes on one store still make one chain).
The key lives in the controller's data directory (``audit.key``, 0600),
never in the store: whoever can write the store but not read the key cannot
forge a MAC. Someone who holds both could rewrite the whole chain; the
controller therefore writes the chain's head (id and MAC) to its log at an
interval (``CHECKPOINT_INTERVAL_SECONDS``), and ``verify --checkpoint ID:MAC``
checks the store against checkpoints shipped off the machine.

Rows from before the chain existed carry no MAC; the chain starts at the first
row that has one, and verification says from where. The deletion of the
newest rows leaves a shorter chain that is whole: only a checkpoint beyond
them shows they are gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controller.errors import ControllerError, StartupError
from controller.store import Parameters, Store, Transaction

log = logging.getLogger(__name__)

#: One event to chain: its time, name, fields as JSON, and the indexed columns (correlation, identity, service).
ChainedEvent = tuple[float, str, str, dict[str, str | None]]

KEY_FILE = "audit.key"
#: 256 bits: the HMAC-SHA256 key size; nobody guesses it.
KEY_BYTES = 32
#: How often the controller writes the chain's head to its log (the journal):
#: a rewrite by someone who also holds the key is caught by a checkpoint at
#: most this much younger than the rewrite; 288 short lines a day.
CHECKPOINT_INTERVAL_SECONDS = 300.0
#: Rows read per statement while verifying: bounded memory on any store size,
#: few enough round trips that a million rows verify in seconds.
VERIFY_BATCH = 20_000
#: Events the controller verifies each time it starts, the newest, in a worker
#: thread once it serves: an edit of recent history shows in the log at the
#: next start, in about 0.1 s; the whole trail is ``audit verify``'s job.
STARTUP_VERIFY_EVENTS = 10_000
#: The columns copied from each row's fields (controller/audit.py): checked against them.
INDEXED_FIELDS = ("correlation", "identity", "service")
_SEPARATOR = b"\x1f"  # never in JSON text (control characters are escaped) nor in an event name


def load_or_create_key(data_dir: Path) -> bytes:
    """The chain's key from ``data_dir/audit.key``, created (0600) on first start."""
    path = data_dir / KEY_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            # Whoever can read the key can forge the chain: owner-only, like the CA key.
            log.warning("the audit chain key %s was readable by others; made it 0600", path)
            path.chmod(0o600)
        return read_key(path)
    try:
        os.write(descriptor, secrets.token_bytes(KEY_BYTES))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return read_key(path)


def read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as error:
        raise StartupError(f"Cannot read the audit chain key {path} ({error.strerror}); restore it from backup.") from None
    if len(key) != KEY_BYTES:
        raise StartupError(f"The audit chain key {path} is not {KEY_BYTES} bytes; restore it from backup "
                           "(a new key would make every existing event fail verification).")
    return key


def compute_mac(key: bytes, previous: str, row_id: int, time: float, event: str, fields: str) -> str:
    message = _SEPARATOR.join((previous.encode(), str(row_id).encode(), repr(float(time)).encode(), event.encode(),
                               fields.encode()))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def insert_chained_many(db: Transaction, key: bytes, events: list[ChainedEvent]) -> None:
    """Insert ``events`` in order as the chain's new heads (inside the caller's write transaction).

    Two writers must never read the same head, and they cannot: every write
    transaction holds the store's one write lock, on every process
    (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's transaction-scoped advisory
    lock; controller/store.py). The head is read once and the rows go to the store in one call: a stop's
    10,000 ``tunnel_closed`` rows cost one read and one statement
    (``Transaction.insert_rows``), not 20,000.
    """
    if not events:
        return
    head = db.query_one("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1")
    row_id = 0 if head is None else int(head["id"])
    previous = "" if head is None or head["mac"] is None else str(head["mac"])
    rows: list[tuple[object, ...]] = []
    for time, event, fields, columns in events:
        row_id += 1
        previous = compute_mac(key, previous, row_id, time, event, fields)
        rows.append((row_id, time, event, fields, columns["correlation"], columns["identity"], columns["service"],
                     previous))
    db.insert_rows("audit", ("id", "time", "event", "fields", "correlation", "identity", "service", "mac"), rows)


def chain_head(store: Store) -> tuple[int, str] | None:
    """(id, MAC) of the newest chained event, or None before the first."""
    row = store.query_one("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1")
    if row is None or row["mac"] is None:
        return None
    return int(row["id"]), str(row["mac"])


def parse_checkpoint(text: str) -> tuple[int, str]:
    """``ID:MAC`` as the controller's log writes it."""
    row_id, _, mac = text.strip().partition(":")
    if not row_id.isdigit() or len(mac) != 64 or any(c not in "0123456789abcdef" for c in mac):
        raise ControllerError("invalid_checkpoint", f"The checkpoint {text[:80]!r} is not ID:MAC as the controller's "
                              "log writes it (audit checkpoint 1234:<64 hex digits>).")
    return int(row_id), mac


@dataclass
class Verification:
    checked: int = 0
    unchained: int = 0  # rows from before the chain existed
    chain_start: int | None = None
    head: tuple[int, str] | None = None
    first_bad: int | None = None
    problem: str | None = None
    checkpoints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "unchained": self.unchained, "chain_start": self.chain_start,
                "head": None if self.head is None else {"id": self.head[0], "mac": self.head[1]},
                "first_bad": self.first_bad, "problem": self.problem, "checkpoints": self.checkpoints,
                "summary": self.summary()}

    def summary(self) -> str:
        if not self.ok:
            return f"event {self.first_bad}: {self.problem}"
        if self.chain_start is None:
            return f"no chained events yet ({self.unchained} events from before the chain carry no MAC)"
        before = f"; the {self.unchained} events before it predate the chain and are not covered" if self.unchained else ""
        checkpoints = f", {len(self.checkpoints)} checkpoint(s) match" if self.checkpoints else ""
        return (f"the chain is whole: {self.checked - self.unchained} events from event {self.chain_start} to "
                f"{self.head[0] if self.head else '-'}{checkpoints}{before}")


class Queryable(Protocol):
    def query(self, sql: str, parameters: Parameters = ()) -> list[Any]: ...


def rows_of(store: Queryable, batch: int = VERIFY_BATCH, after: int = -1) -> Iterator[Any]:
    """Every audit row (after the id ``after``) in id order, a batch per statement."""
    while True:
        rows = store.query("SELECT id, time, event, fields, correlation, identity, service, mac FROM audit "
                           "WHERE id > ? ORDER BY id LIMIT ?", (after, batch))
        yield from rows
        if len(rows) < batch:
            return
        after = int(rows[-1]["id"])


def verify(rows: Iterable[Any], key: bytes, checkpoints: Sequence[tuple[int, str]] = (), *,
           anchored: bool = False) -> Verification:
    """Walk the chain; the first event that does not fit is named with the reason.

    ``anchored``: ``rows`` start in the middle of the chain; the first chained
    one is taken as it is (its MAC links the next), the rest are verified.
    """
    result = Verification()
    wanted = dict(checkpoints)
    named = set(wanted)
    previous: str | None = None  # the last chained row's MAC, once the chain started
    last_id: int | None = None
    for row in rows:
        result.checked += 1
        row_id, mac = int(row["id"]), row["mac"]
        problem = None
        if mac is None:
            if previous is None:
                result.unchained += 1
                last_id = row_id
                continue
            problem = "it carries no MAC inside the chain (inserted or edited)"
        elif previous is None:
            result.chain_start, previous = row_id, ""
            if anchored:
                previous, last_id, result.head = str(mac), row_id, (row_id, str(mac))
                continue
        elif last_id is not None and row_id != last_id + 1:
            problem = (f"it follows event {last_id}: event(s) {last_id + 1} to {row_id - 1} are missing (deleted)"
                       if row_id > last_id + 1 else f"its id does not follow event {last_id} (renumbered)")
        if problem is None and not hmac.compare_digest(
                str(mac), compute_mac(key, previous or "", row_id, row["time"], row["event"], row["fields"])):
            problem = ("its MAC does not match: the event was edited, inserted or moved, or the one before it "
                       "was deleted" + (", or audit.key is not the key the chain was written with"
                                        if row_id == result.chain_start else ""))
        if problem is None:
            problem = _columns_problem(row)
        if problem is None and row_id in wanted and wanted.pop(row_id) != mac:
            problem = "it does not match the checkpoint given for it (the chain was rewritten)"
        if problem is not None:
            result.first_bad, result.problem = row_id, problem
            return result
        if row_id in named:
            result.checkpoints.append(f"{row_id}:{mac}")
        previous, last_id = str(mac), row_id
        result.head = (row_id, str(mac))
    if wanted:
        missing = min(wanted)
        result.first_bad = missing
        result.problem = (f"the checkpoint names event {missing}, which the chain no longer holds (the newest events "
                          "were deleted or the chain was rewritten)")
    return result


def _columns_problem(row: Any) -> str | None:
    try:
        fields = json.loads(row["fields"])
    except ValueError:
        return "its fields are not JSON"
    for column in INDEXED_FIELDS:
        value = fields.get(column) if isinstance(fields, dict) else None
        if row[column] != (value if isinstance(value, str) else None):
            return f"its {column} column does not match its fields (edited)"
    return None


async def log_checkpoints(store: Store, interval: float = CHECKPOINT_INTERVAL_SECONDS) -> None:
    """Write the chain's head to the log now and every ``interval`` while it moves (until cancelled)."""
    last: tuple[int, str] | None = None
    while True:
        last = log_checkpoint(store, last)
        await asyncio.sleep(interval)


def log_checkpoint(store: Store, last: tuple[int, str] | None = None) -> tuple[int, str] | None:
    """Log ``audit checkpoint ID:MAC`` unless the head is still ``last``; the head."""
    head = chain_head(store)
    if head is not None and head != last:
        # The line ships with the journal: what ``verify --checkpoint`` takes, as it is.
        log.info("audit checkpoint %d:%s", *head)
    return head


def verify_recent(store: Store, key: bytes, count: int = STARTUP_VERIFY_EVENTS) -> Verification:
    """The newest ``count`` events' links, anchored on the one before them (all of a smaller trail)."""
    row = store.query_one("SELECT MAX(id) AS id FROM audit")
    newest = int(row["id"]) if row is not None and row["id"] is not None else 0
    anchor = newest - count  # this row is taken as it is; every later one is verified
    return verify(rows_of(store, after=anchor - 1), key, anchored=anchor > 0)


async def check_recent_at_start(store: Store, key: bytes) -> None:
    """Log whether the newest events verify (the controller serves meanwhile)."""
    try:
        result = await asyncio.to_thread(verify_recent, store, key)
    except Exception as error:  # a busy or damaged store must not stop the controller from serving
        log.error("audit: the newest events could not be verified (%s); run outpost-controller audit verify", error)
        return
    if result.ok:
        log.info("audit: the newest %d events verify", result.checked)
    else:
        log.error("audit: the trail fails verification at %s; run outpost-controller audit verify --data DIR",
                  result.summary())
