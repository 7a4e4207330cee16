"""One stream's state machine: a transition table, as in h2, with acceptance folded into the state.

Anything not in ``TRANSITIONS`` is illegal. ``Stream.take`` (``STREAM_TABLE``) is the one
way a stream moves: it raises ``LocalProtocolError`` for an illegal local
input and ``RemoteProtocolError`` for an illegal peer input, which the stream
table turns into a stream reset (the tunnel lives on).
"""

from __future__ import annotations

import enum

from shared.protocol.errors import ErrorCode
from shared.protocol.transitions import MachineInput, TransitionTable


class StreamState(enum.Enum):
    # Identity hash, as for ``MachineInput``: the table is looked up per frame.
    __hash__ = object.__hash__

    IDLE = "idle"
    #: opened; data may flow both ways, ACCEPT not yet sent (peer-opened) or received (opened here)
    OPEN_UNACCEPTED = "open, not yet accepted"
    OPEN = "open"
    #: this end sent FIN; the peer may still send
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_LOCAL_UNACCEPTED = "half-closed (local), not yet accepted"
    #: the peer sent FIN; this end may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    HALF_CLOSED_REMOTE_UNACCEPTED = "half-closed (remote), not yet accepted"
    CLOSED = "closed"


class StreamInput(MachineInput):
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

#: The accepted stream's moves; a stream not yet accepted moves alike (below).
_ACCEPTED: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.SEND_FIN): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_FIN): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_RESET): S.CLOSED,
    (S.OPEN, I.RECV_RESET): S.CLOSED,
    (S.OPEN, I.SEND_WINDOW): S.OPEN,
    (S.OPEN, I.RECV_WINDOW): S.OPEN,

    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_FIN): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_WINDOW): S.HALF_CLOSED_LOCAL,
    # Credit for data we no longer send: it was in flight, harmless.
    (S.HALF_CLOSED_LOCAL, I.RECV_WINDOW): S.HALF_CLOSED_LOCAL,

    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_FIN): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_WINDOW): S.HALF_CLOSED_REMOTE,
}

#: Each live state's twin before ACCEPT. Data may flow before ACCEPT, and a
#: short exchange may even be half closed before it, so every live state has one.
UNACCEPTED: dict[StreamState, StreamState] = {
    S.OPEN: S.OPEN_UNACCEPTED,
    S.HALF_CLOSED_LOCAL: S.HALF_CLOSED_LOCAL_UNACCEPTED,
    S.HALF_CLOSED_REMOTE: S.HALF_CLOSED_REMOTE_UNACCEPTED,
    S.CLOSED: S.CLOSED,
}

TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPEN_UNACCEPTED,
    (S.IDLE, I.RECV_OPEN): S.OPEN_UNACCEPTED,
    **_ACCEPTED,
    # Not yet accepted: the same moves, staying not yet accepted ...
    **{(UNACCEPTED[state], stream_input): UNACCEPTED[new] for (state, stream_input), new in _ACCEPTED.items()},
    # ... until ACCEPT, once, sent by the end that did not open the stream and received by the one that did.
    **{(UNACCEPTED[state], accept): state
       for state in (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE)
       for accept in (I.SEND_ACCEPT, I.RECV_ACCEPT)},
}

del S, I


def _remote_code(stream_input: StreamInput) -> ErrorCode:
    """The RESET code for a peer's input the table refuses (docs/protocol.md, Streams)."""
    if stream_input in (StreamInput.RECV_DATA, StreamInput.RECV_FIN):
        return ErrorCode.STREAM_CLOSED
    return ErrorCode.PROTOCOL_ERROR


#: The one way a stream takes a transition, for what this end does and for what the peer sent.
STREAM_TABLE: TransitionTable[StreamState, StreamInput] = TransitionTable(
    TRANSITIONS, local_code=ErrorCode.STREAM_CLOSED, remote_code=_remote_code)
#: its rows, which ``Stream.take`` reads directly
_STREAM_ROWS = STREAM_TABLE.rows


class Stream:
    """The per-stream bookkeeping the connection keeps while a stream lives."""

    __slots__ = ("stream_id", "state", "local", "send_window", "recv_window", "unacknowledged", "owed")

    def __init__(self, stream_id: int, *, local: bool, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.state = StreamState.IDLE
        #: opened by this end
        self.local = local
        self.send_window = send_window
        self.recv_window = recv_window
        #: bytes received and handed to the application, not yet acknowledged
        self.unacknowledged = 0
        #: bytes acknowledged by the application, not yet returned to the peer
        self.owed = 0

    def take(self, stream_input: StreamInput, state: StreamState | None = None) -> StreamState:
        """The state ``stream_input`` leads to from ``state`` (default: the stream's own); raises when illegal."""
        # STREAM_TABLE.take inlined: it runs for every frame, and its subject sentence is only needed
        # when the step is refused, so it is not formatted for each frame that is not.
        if state is None:
            state = self.state
        new_state = _STREAM_ROWS.get((state, stream_input))
        if new_state is None:
            raise STREAM_TABLE.refusal(state, stream_input, f"stream {self.stream_id}")
        return new_state

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.state.value}>"
