"""A transition table keyed by ``(state, input)``, and the one way every part of the core takes a step in it.

The handshake (``handshake.py``) and every stream (``streams.py``) are such
tables. Whatever is not in a table is illegal: an input this end chose
(``send ...``) is the caller's misuse, ``LocalProtocolError``; an input the
peer sent (``receive ...``) is the peer's, ``RemoteProtocolError`` with the
code that goes on the wire. What a refused peer input ends (the stream or the
whole tunnel) is the caller's to decide from the error's code.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from shared.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError

_RECEIVE = "receive "


class MachineInput(enum.Enum):
    """An input of a transition table; its value reads ``send FRAME`` or ``receive FRAME``."""

    # Members are singletons compared by identity, so identity is a valid hash; Enum's own hashes
    # the name in Python, a frame per table lookup, and the core looks up a step per frame.
    __hash__ = object.__hash__

    @property
    def received(self) -> bool:
        """True for what the peer sent, False for what this end chose to do."""
        return str(self.value).startswith(_RECEIVE)

    @property
    def frame(self) -> str:
        """The frame the input is about, as the protocol names it."""
        return str(self.value).split(" ", 1)[1]


StateT = TypeVar("StateT", bound=enum.Enum)
InputT = TypeVar("InputT", bound=MachineInput)


class TransitionTable(Generic[StateT, InputT]):
    """``(state, input) -> next state``; anything else is refused with the error its origin calls for."""

    __slots__ = ("rows", "_local_code", "_remote_code")

    def __init__(self, rows: Mapping[tuple[StateT, InputT], StateT], *,
                 local_code: ErrorCode, remote_code: Callable[[InputT], ErrorCode]) -> None:
        #: the table itself; ``Stream.take`` reads it directly (a step per frame), as a test may
        self.rows = rows
        self._local_code = local_code
        self._remote_code = remote_code

    def take(self, state: StateT, event: InputT, subject: str) -> StateT:
        """The state ``event`` leads to from ``state``; raises the refusal when the table has no such row.

        ``subject`` names what moves ("stream 5", "the relay's handshake") in the sentence.
        """
        new_state = self.rows.get((state, event))
        if new_state is None:
            raise self.refusal(state, event, subject)
        return new_state

    def allows(self, state: StateT, event: InputT) -> bool:
        return (state, event) in self.rows

    def refusal(self, state: StateT, event: InputT, subject: str) -> ProtocolError:
        if event.received:
            return RemoteProtocolError(self._remote_code(event),
                                       f"unexpected {event.frame} on {subject}: it is {state.value}")
        return LocalProtocolError(self._local_code, f"cannot {event.value} on {subject}: it is {state.value}")
