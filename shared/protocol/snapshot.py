"""What one tunnel end holds at one moment, as frozen values: for tests, diagnostics and status.

``Connection.snapshot()`` builds one; comparing two tells whether a call
changed anything (a refused call must not), without reading the parts'
private state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.protocol.state import Handshake, Role
from shared.protocol.streams import StreamState


@dataclass(frozen=True)
class StreamSnapshot:
    """One stream's state and flow control."""

    stream_id: int
    state: StreamState
    #: opened by this end
    local: bool
    send_window: int
    recv_window: int
    #: received and handed to the application, not yet acknowledged by it
    unacknowledged: int
    #: acknowledged by the application, not yet returned to the peer as WINDOW
    owed: int


@dataclass(frozen=True)
class ConnectionSnapshot:
    """One tunnel end: handshake, streams with their windows, budgets, and the bytes waiting either way."""

    role: Role
    handshake: Handshake
    authenticated: bool
    closed: bool
    #: live streams by id
    streams: Mapping[int, StreamSnapshot]
    #: streams closed both ways whose reader still holds unacknowledged bytes, by id
    draining: Mapping[int, StreamSnapshot]
    #: ids this end reset lately, oldest first: frames still in flight for them are dropped quietly
    recently_reset: tuple[int, ...]
    #: the id this end's next stream gets
    next_stream_id: int
    #: streams the peer opened that count against ``ProtocolLimits.max_streams``
    peer_streams: int
    binds_pending: int
    #: received bytes not yet acknowledged, all streams together, against ``receive_budget``
    unread_bytes: int
    receive_budget: int
    #: queued for ``data_to_send`` and not yet taken
    queued: bytes
    #: bytes of an incomplete received frame
    buffered: int
    bytes_sent: int
    bytes_received: int
