"""Telling agents to go: a busy relay's refusal with a come-back time, and the stop's GOAWAY to every tunnel."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from shared.fsutil import atomic_write
from shared.protocol import ErrorCode, goaway_frame
from shared.protocol.limits import COME_BACK_SPREAD
from shared.tunnel.transport import StreamTransport

if TYPE_CHECKING:
    from controller.relay.relay import Relay
    from controller.relay.session import RelaySession

log = logging.getLogger(__name__)

# A stop waits this long, in all, for its tunnels' closing handshakes (GOAWAY, then the WebSocket close);
# the rest are reset. Closing each in turn took 8-9 s at 10,000 tunnels, all of it CPU, and an agent
# reconnects on GOAWAY or a reset alike: the GOAWAY leaves in the first write, and waiting longer for
# the rest of the handshake helps no one. Half a second, and a loaded loop overruns it (1.9 s measured
# for 1.0 at 7,000 tunnels), which keeps a stop under the 2 s goal.
SHUTDOWN_CLOSE_GRACE = 0.5
#: In the data directory: the wall-clock time until which a stopped relay's told agents keep
#: returning, read by the process started after it on that directory (``follow_predecessor``).
SCHEDULE_FILE = "come-back.json"
#: Not a secret (a time), but in the data directory beside keys: readable by the owner alone like the rest.
SCHEDULE_FILE_MODE = 0o600
#: A recorded schedule ending further ahead than this is not followed: agents follow no time
#: above 300 s (agent/tunnel/backoff.py), so a later end is a wrong clock or a damaged file.
MAX_FOLLOWED = 300.0
BUSY_REASON = "this relay is admitting as many tunnels as it can; come back after the time it gives"


def come_back_later(relay: Relay) -> web.Response:
    """503 with the whole seconds after which this agent gets a slot: the told agents return paced."""
    seconds = relay.pacer.come_back(asyncio.get_running_loop().time(), relay.admitting)
    return web.Response(status=503, headers={"Retry-After": str(math.ceil(seconds))},
                        text="this relay is admitting as many tunnels as it can; come back after Retry-After\n")


def tell_busy(relay: Relay, link: StreamTransport) -> None:
    """Refuse a tunnel on TLS before its CHALLENGE: one GOAWAY(BUSY) with its come-back time, then a FIN.

    No TLS goodbye: waiting for the peer's close_notify costs a busy relay more than the
    GOAWAY did, and tells the agent nothing more. The kernel still sends what it holds.
    """
    seconds = relay.pacer.come_back(asyncio.get_running_loop().time(), relay.admitting)
    transport = link.writer.transport
    if not transport.is_closing():
        transport.write(goaway_frame(ErrorCode.BUSY, BUSY_REASON, seconds))
    transport.abort()


async def stop(relay: Relay) -> None:
    """Close every tunnel (process shutdown): GOAWAY to all, each with its own come-back time.

    A tunnel on TLS directly gets its GOAWAY written and its TCP connection ended at once
    (``leave_at_stop``); a WebSocket gets its closing handshake, and a reset if that has not
    finished within ``shutdown_grace``, so the stop takes that long at most, however many.
    """
    loop = asyncio.get_running_loop()
    sessions = list(relay.sessions)
    told = [None] * len(sessions) if relay.retiring else relay.pacer.stop_times(len(sessions))
    graceful: list[RelaySession] = []
    with relay.audit_queue.held():
        for session, seconds in zip(sessions, told, strict=True):
            # Each is told its own time to come back, so the fleet returns at the pace a relay admits.
            session.conn.close(ErrorCode.NO_ERROR, "relay shutting down", retry_after=seconds)
            if not session.leave_at_stop():
                graceful.append(session)
    if told and told[-1] is not None:
        record_schedule(relay, told[-1] + COME_BACK_SPREAD)  # the last told agents' own spread
    closing = {loop.create_task(s.close(ErrorCode.NO_ERROR, "relay shutting down")): s for s in graceful}
    if closing:
        _, late = await asyncio.wait(closing, timeout=relay.shutdown_grace)
        for task in late:
            closing[task].abort()  # its GOAWAY, if written, is on its way; the agent reconnects either way
            # Its close would otherwise sit out CLOSE_TIMEOUT on a WebSocket close the reset ended
            # (3 s more at 7,000 tunnels).
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
    if relay.peering is not None:
        await relay.peering.close()
    # The tunnels' last audit rows and their presence reach the store before it closes.
    await relay.audit_queue.drained()
    await relay.presence.close()


def _schedule_path(relay: Relay) -> Path | None:
    settings = getattr(relay.context, "settings", None)
    data_dir = getattr(settings, "data_dir", None)
    return Path(data_dir) / SCHEDULE_FILE if data_dir is not None else None


def record_schedule(relay: Relay, seconds: float) -> None:
    """Leave, for the next process on this data directory, when the agents this stop told stop arriving.

    Wall-clock time: the loop's clock does not outlive the process. Written whole or not at all,
    and flushed to disk: a stop is often a reboot, and a file renamed but not synced can come back
    empty after it. Without it the next process paces as if it were first.
    """
    path = _schedule_path(relay)
    if path is None:
        return
    try:
        atomic_write(path, json.dumps({"until": time.time() + seconds}).encode(), mode=SCHEDULE_FILE_MODE)
    except OSError as exc:
        log.warning("could not record the come-back times told at this stop in %s (%s); the next start paces "
                    "refused agents without them", path, exc.strerror)


def follow_predecessor(relay: Relay, loop: asyncio.AbstractEventLoop) -> None:
    """Hand out no slot while the agents a stopped predecessor told are still arriving (``record_schedule``)."""
    path = _schedule_path(relay)
    if path is None:
        return
    try:
        text = path.read_text(encoding="utf-8")
        path.unlink()  # read once: a later start must not follow a schedule long past
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not read %s (%s): refused agents are paced as if this relay were the first; "
                    "remove the file", path, exc.strerror)
        return
    try:
        until = json.loads(text)["until"]
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring %s: it holds no come-back schedule; refused agents are paced as if this relay "
                    "were the first", path)
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or math.isnan(until):
        log.warning("ignoring %s: its time is not a number; refused agents are paced as if this relay were the first",
                    path)
        return
    remaining = until - time.time()
    if 0 < remaining <= MAX_FOLLOWED:
        relay.pacer.follow(loop.time() + remaining)
