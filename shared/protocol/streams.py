"""One stream's state machine: a transition table, as in h2.

Anything not in ``TRANSITIONS`` is illegal. The connection turns an illegal
peer input into a stream reset (or a connection error) and an illegal local
input into ``LocalProtocolError``.
"""

from __future__ import annotations

import enum


class StreamState(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    #: this end sent FIN; the peer may still send
    HALF_CLOSED_LOCAL = "half-closed (local)"
    #: the peer sent FIN; this end may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(enum.Enum):
    SEND_OPEN = "send OPEN"
    RECV_OPEN = "receive OPEN"
    SEND_ACCEPT = "send ACCEPT"
    RECV_ACCEPT = "receive ACCEPT"
    SEND_DATA = "send DATA"
    RECV_DATA = "receive DATA"
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"
    SEND_RESET = "send RESET"
    RECV_RESET = "receive RESET"
    SEND_WINDOW = "send WINDOW"
    RECV_WINDOW = "receive WINDOW"


S = StreamState
I = StreamInput  # noqa: E741 - the table reads as a table with short names

TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPEN,
    (S.IDLE, I.RECV_OPEN): S.OPEN,

    # Data may flow before ACCEPT, and a short exchange may even be half
    # closed before it, so ACCEPT is legal in every live state.
    (S.OPEN, I.SEND_ACCEPT): S.OPEN,
    (S.OPEN, I.RECV_ACCEPT): S.OPEN,
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_RESET): S.CLOSED,
    (S.OPEN, I.RECV_RESET): S.CLOSED,
    (S.OPEN, I.SEND_WINDOW): S.OPEN,
    (S.OPEN, I.RECV_WINDOW): S.OPEN,

    (S.HALF_CLOSED_LOCAL, I.SEND_ACCEPT): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_ACCEPT): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_WINDOW): S.HALF_CLOSED_LOCAL,
    # Credit for data we no longer send: it was in flight, harmless.
    (S.HALF_CLOSED_LOCAL, I.RECV_WINDOW): S.HALF_CLOSED_LOCAL,

    (S.HALF_CLOSED_REMOTE, I.SEND_ACCEPT): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.RECV_ACCEPT): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_WINDOW): S.HALF_CLOSED_REMOTE,
}

del S, I


class Stream:
    """The per-stream bookkeeping the connection keeps while a stream lives."""

    __slots__ = ("stream_id", "state", "local", "accepted", "send_window", "recv_window", "unacknowledged", "owed")

    def __init__(self, stream_id: int, *, local: bool, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.state = StreamState.IDLE
        #: opened by this end
        self.local = local
        self.accepted = False
        self.send_window = send_window
        self.recv_window = recv_window
        #: bytes received and handed to the application, not yet acknowledged
        self.unacknowledged = 0
        #: bytes acknowledged by the application, not yet returned to the peer
        self.owed = 0

    def next_state(self, stream_input: StreamInput) -> StreamState | None:
        """The state ``stream_input`` leads to, or None when it is illegal now."""
        return TRANSITIONS.get((self.state, stream_input))

    @staticmethod
    def next_state_from(state: StreamState, stream_input: StreamInput) -> StreamState | None:
        return TRANSITIONS.get((state, stream_input))

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.state.value}>"
