"""Telling agents to go: a busy relay's refusal with a come-back time, and the stop's GOAWAY to every tunnel."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from aiohttp import web

from shared.protocol import ErrorCode, goaway_frame
from shared.tunnel.transport import StreamTransport

if TYPE_CHECKING:
    from controller.relay.relay import Relay
    from controller.relay.session import RelaySession

# A stop waits this long, in all, for its tunnels' closing handshakes (GOAWAY, then the WebSocket close);
# the rest are reset. Closing each in turn took 8-9 s at 10,000 tunnels, all of it CPU, and an agent
# reconnects on GOAWAY or a reset alike: the GOAWAY leaves in the first write, and waiting longer for
# the rest of the handshake helps no one. Half a second, and a loaded loop overruns it (1.9 s measured
# for 1.0 at 7,000 tunnels), which keeps a stop under the 2 s goal.
SHUTDOWN_CLOSE_GRACE = 0.5
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
    for session, seconds in zip(sessions, told, strict=True):
        # Each is told its own time to come back, so the fleet returns at the pace a relay admits.
        session.conn.close(ErrorCode.NO_ERROR, "relay shutting down", retry_after=seconds)
        if not session.leave_at_stop():
            graceful.append(session)
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
