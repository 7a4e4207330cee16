"""Field enrollment: ``outpost-agent run`` finds a token file and enrolls from it.

A technician drops the token file from central ops in one of the documented
places (the Raspberry Pi boot partition, ``/etc/outpost/``) and powers the
gateway on. Until it is enrolled the agent reports "waiting for enrollment:
<why>" to systemd and keeps looking:

- a failure a retry can fix (no network yet, controller down, the clock not
  yet set) is retried with backoff;
- a token that can never work (expired, used, altered, for another
  controller) is left where it is, named in one log line, remembered by its
  content hash so the same file is not tried again, and the agent waits for
  a new file; a refused file does not hide a new one in a later place;
- on success the token is deleted (or renamed ``*.used``) so it is never
  offered again, and the agent goes on to the tunnel; a token left behind by
  a stop between enrollment and that step is retired at the next start. A
  refused token in the state directory is the agent's own copy (moved there
  from the boot partition), so it goes too, with the refusal note, once the
  gateway is enrolled; refused files elsewhere are the technician's and stay.

The token's expiry and the controller's certificate are judged by trusted
time, measured (NTP and the controller's time over the CA the token pins)
at every attempt, so a gateway that boots in 1970 or a year ahead enrolls.

The decisions live in ``EnrollmentSchedule`` (plain numbers, ``now`` passed
in); ``wait_for_enrollment`` is the thin asyncio glue around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.clock.trusted import TrustedClock
from agent.enrollment.places import BOOT_TOKEN as BOOT_TOKEN
from agent.enrollment.places import ETC_TOKEN as ETC_TOKEN
from agent.enrollment.places import REFUSED_NOTE
from agent.enrollment.places import STATE_TOKEN_NAME as STATE_TOKEN_NAME
from agent.enrollment.places import default_token_paths as default_token_paths
from agent.enrollment.places import token_paths as token_paths
from agent.enrollment.token import MAX_TOKEN_FILE, parse_unverified, read_token_file
from agent.errors import OutpostError
from agent.identity.select import KeyStoreSettings
from agent.identity.state import EnrolledIdentity, StateDir
from agent.proxy import ProxySettings
from agent.tunnel.backoff import Backoff
from shared import service_manager
from shared.fsutil import atomic_write, ensure_private_dir
from shared.trust import ca_fingerprint
from shared.utc import format_utc

log = logging.getLogger(__name__)

USED_SUFFIX = ".used"
#: How often to look for a new token file while waiting: a technician who
#: drops one waits at most this long, and a few stat() calls cost nothing.
POLL_INTERVAL = 5.0
#: First retry bound after a failure a retry can fix.
RETRY_INITIAL = 2.0
#: Longest wait between retries: a technician is often standing by, and a
#: minute after the network comes back is the longest they should wait.
RETRY_CAP = 60.0
#: Full jitter can draw almost zero; never retry faster than this.
MIN_RETRY_DELAY = 1.0
#: The refused-token note is a few hundred bytes; bound what a damaged one costs.
MAX_NOTE = 16 * 1024


@dataclass(frozen=True)
class TokenFile:
    """A token file found on disk; ``digest`` changes whenever its content does."""

    path: Path
    digest: str


def find_tokens(paths: Sequence[Path]) -> tuple[TokenFile, ...]:
    """Every one of ``paths`` that is a regular file, in the order given."""
    found: list[TokenFile] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as handle:
                digest = "sha256:" + hashlib.sha256(handle.read(MAX_TOKEN_FILE + 1)).hexdigest()
        except OSError:
            # Enrollment will say why it cannot be read; a change of size or
            # time (someone fixed the permissions) makes it worth another try.
            digest = f"unreadable:{stat.st_size}:{stat.st_mtime_ns}"
        found.append(TokenFile(path, digest))
    return tuple(found)


def find_token(paths: Sequence[Path]) -> TokenFile | None:
    """The first of ``paths`` that is a regular file, or None."""
    found = find_tokens(paths)
    return found[0] if found else None


@dataclass(frozen=True)
class Attempt:
    """Try to enroll from ``token`` now."""

    token: TokenFile


@dataclass(frozen=True)
class Wait:
    """Look again in ``seconds``; ``reason`` is the plain sentence for the status line."""

    seconds: float
    reason: str


@dataclass
class EnrollmentSchedule:
    """Which token to try when, given what was found and what failed before."""

    missing_reason: str
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=RETRY_INITIAL, cap=RETRY_CAP))
    poll_interval: float = POLL_INTERVAL
    #: digest -> the sentence it was refused with.
    refused: dict[str, str] = field(default_factory=dict)
    _retrying: TokenFile | None = None
    _retry_at: float = 0.0
    _retry_reason: str = ""

    def next_step(self, found: Sequence[TokenFile], now: float) -> Attempt | Wait:
        """What to do with the token files ``found`` (in the documented order) at ``now``."""
        if not found:
            return Wait(self.poll_interval, self.missing_reason)
        # A refused file stays where the technician put it; it must not hide a new one elsewhere.
        untried = [token for token in found if token.digest not in self.refused]
        if not untried:
            return Wait(self.poll_interval, self.refused[found[0].digest])
        token = untried[0]
        if token == self._retrying and now < self._retry_at:
            # Wake up to poll meanwhile: a corrected token must not wait out the backoff.
            return Wait(min(self.poll_interval, self._retry_at - now), self._retry_reason)
        return Attempt(token)

    def failed(self, token: TokenFile, reason: str, retryable: bool, now: float) -> float | None:
        """Record a failed attempt; the delay before the retry, or None when refused for good."""
        if not retryable:
            self.refused[token.digest] = reason
            self._retrying = None
            return None
        if token != self._retrying:
            self.backoff.reset()
        delay = max(MIN_RETRY_DELAY, self.backoff.next_delay())
        self._retrying, self._retry_at, self._retry_reason = token, now + delay, reason
        return delay


def retire_token(path: Path) -> str | None:
    """Delete a redeemed token, or rename it ``*.used``; a sentence when neither works."""
    try:
        path.unlink()
        return None
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        path.rename(path.with_name(path.name + USED_SUFFIX))
        return None
    except OSError as error:
        return (
            f"enrolled, but the used token {path} could not be removed ({error.strerror or error}); "
            "delete it by hand (until it expires, the controller accepts it again from this gateway's key)"
        )


def retire_redeemed_tokens(paths: Sequence[Path], identity: EnrolledIdentity) -> None:
    """Retire token files that name the enrolled ``identity`` (at start, on an enrolled gateway).

    A stop between storing the enrollment and retiring its token leaves the
    token in place, and an enrolled agent never looks for tokens again; this
    is where it goes. Tokens for anything else are left alone.
    """
    pinned = ca_fingerprint(identity.ca_certificate())
    for token in find_tokens(paths):
        try:
            claims = parse_unverified(read_token_file(token.path))
        except OutpostError:
            continue
        if (claims.sub, claims.tnt, claims.controller_url, claims.ca) != (
                identity.name, identity.tenant, identity.controller_url, pinned):
            continue
        problem = retire_token(token.path)
        if problem is None:
            log.info("removed the token %s: this gateway is enrolled from it as %s", token.path, identity.uri)
        else:
            log.warning("%s", problem)


def remove_refused_copies(config: Any, refused: Collection[str]) -> None:
    """On an enrolled gateway: delete the token files in the state directory whose content was refused
    (digests in ``refused``), and the refusal note.

    Such a file is the agent's own copy (``take-boot-token`` moved it there),
    a dead credential nobody else cleans up; a refused file in any other
    place is the technician's, and stays where it was put.
    """
    state_dir = Path(config.state_dir)
    copies = [path for path in token_paths(config) if path.parent == state_dir]
    for token in find_tokens(copies):
        if token.digest in refused:
            try:
                token.path.unlink()
            except OSError as error:
                log.warning("cannot remove the refused token %s (%s)", token.path, error.strerror or error)
            else:
                log.info("removed the refused token %s: this gateway is enrolled", token.path)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / REFUSED_NOTE).unlink()


def load_refusals(state_dir: Path) -> dict[str, str]:
    """The refused-token note, as digest -> sentence; empty when absent or damaged."""
    try:
        with open(Path(state_dir) / REFUSED_NOTE, "rb") as handle:
            note = json.loads(handle.read(MAX_NOTE))
    except (OSError, ValueError):
        return {}
    if isinstance(note, dict) and isinstance(note.get("digest"), str) and isinstance(note.get("reason"), str):
        return {note["digest"]: note["reason"]}
    return {}


def save_refusal(state_dir: Path, token: TokenFile, reason: str) -> None:
    """Remember the refused token (only the latest) across restarts."""
    note = {"digest": token.digest, "path": str(token.path), "reason": reason, "at": time.time()}
    try:
        # A fresh gateway's first refused token comes before anything else is stored.
        ensure_private_dir(Path(state_dir))
        atomic_write(Path(state_dir) / REFUSED_NOTE, (json.dumps(note, indent=2) + "\n").encode(), 0o600)
    except OSError as error:
        # Only costs one more refused attempt after a restart.
        log.warning("cannot record the refused token in %s (%s)", state_dir, error.strerror or error)


#: agent.enrollment.enroll.enroll_async: (token, state dir, key store, now, clock, proxy).
Enroll = Callable[[Path, Path, KeyStoreSettings, "float | None", TrustedClock, ProxySettings],
                  Awaitable[EnrolledIdentity]]


async def _enroll_from(token: TokenFile, config: Any, enroll: Enroll) -> EnrolledIdentity:
    # Measured afresh at every attempt: NTP or the controller may be reachable by now.
    return await enroll(token.path, config.state_dir, config.keystore, None, TrustedClock(config.clock), config.proxy)


async def wait_for_enrollment(
    config: Any,
    *,
    stop: asyncio.Event | None = None,
    enroll: Enroll | None = None,
    schedule: EnrollmentSchedule | None = None,
    clock: Callable[[], float] = time.time,
) -> EnrolledIdentity | None:
    """Until enrolled: find a token, enroll, retry or wait; None when stopped first.

    Tells systemd it is ready (``READY=1``) with "waiting for enrollment:
    <why>" as soon as it has to wait, and feeds the watchdog meanwhile.
    Without ``stop``, SIGTERM and SIGINT stop the wait. ``clock`` only paces
    polls and retries; every decision about the token is made on trusted time.
    """
    if enroll is None:
        from agent.enrollment.enroll import enroll_async

        enroll = enroll_async
    state = StateDir(config.state_dir)
    paths = token_paths(config)
    if schedule is None:
        schedule = EnrollmentSchedule(
            missing_reason=f"no token file in {', '.join(map(str, paths))}; copy the token file from central ops to one of them",
        )
    schedule.refused.update(load_refusals(state.path))
    loop = asyncio.get_running_loop()
    own_signals = stop is None
    stop = stop or asyncio.Event()
    if own_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
    interval = service_manager.watchdog_interval()
    watchdog = loop.create_task(service_manager.feed_watchdog(interval)) if interval else None
    shown: str | None = None
    try:
        while not stop.is_set():
            if state.is_enrolled():  # enrolled by hand meanwhile
                remove_refused_copies(config, schedule.refused.keys())
                return state.load()
            found = find_tokens(paths)
            step = schedule.next_step(found, clock())
            if isinstance(step, Attempt):
                identity = await _attempt(step.token, config, enroll, schedule, stop, clock)
                if identity is not None:
                    return identity
                continue
            status = f"waiting for enrollment: {step.reason}"
            if shown is None:
                service_manager.notify_ready(status)
            elif status != shown:
                service_manager.notify_status(status)
            if status != shown and not found:
                log.info("%s", status)
            shown = status
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), step.seconds)
        service_manager.notify_stopping()
        return None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if own_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)


async def _attempt(
    token: TokenFile, config: Any, enroll: Enroll, schedule: EnrollmentSchedule,
    stop: asyncio.Event, clock: Callable[[], float],
) -> EnrolledIdentity | None:
    """One enrollment try; None after a failure (recorded in ``schedule``) or a stop."""
    service_manager.notify_status(f"enrolling from {token.path}")
    attempt = asyncio.ensure_future(_enroll_from(token, config, enroll))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not attempt.done():
        # The key and anything half-done stay for the next start: enrollment is built for that.
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, OutpostError):
            await attempt
        return None
    try:
        identity = attempt.result()
    except OutpostError as error:
        if error.terminal:
            raise  # the TPM refused authorization: not the token's fault, so it is not marked refused
        delay = schedule.failed(token, str(error), error.retryable, clock())
        if delay is None:
            log.error("could not enroll from %s: %s", token.path, error)
            save_refusal(config.state_dir, token, str(error))
        else:
            log.warning("could not enroll from %s yet: %s (trying again in %.0f s)", token.path, error, delay)
        return None
    problem = retire_token(token.path)
    if problem is not None:
        log.warning("%s", problem)
    remove_refused_copies(config, schedule.refused.keys())
    log.info("enrolled from %s as %s; certificate valid until %s", token.path, identity.uri,
             format_utc(identity.not_after().timestamp()),
             extra=service_manager.journal_fields(service_manager.EVENT_ENROLLED, identity=identity.uri))
    service_manager.notify_status(f"enrolled as {identity.uri}; connecting")
    return identity
