"""Correlation ids: one id names every audit event that one attempt causes.

A dial's connection id, a tunnel's id, an enrollment's or a management
request's id is the ``correlation`` field of each event it leads to, so
``outpostctl audit --correlation ID`` (and ``outpostctl connections``) show
the whole story of one attempt. The id, and fields every event of the
attempt shares (a management request's actor), live in a context variable:
the worker pools copy the context into their threads (controller/blocking.py),
so code deep in the registry records them without passing them along.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
from collections.abc import Iterator
from typing import Any

#: Random bytes of an id: 64 bits do not collide among the billions of
#: attempts a fleet makes in its lifetime, and stay short in a log line.
CORRELATION_BYTES = 8

#: The kinds of attempt, as the id's prefix: an id says what it names.
CONNECTION = "c"
TUNNEL = "t"
ENROLLMENT = "e"
RENEWAL = "r"
MANAGEMENT = "m"
GRANT = "g"
OTHER = "a"

_scope: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("audit_scope", default=None)


def new_id(kind: str) -> str:
    """A fresh correlation id for an attempt of ``kind`` (one of the constants above)."""
    return f"{kind}-{secrets.token_hex(CORRELATION_BYTES)}"


def scope_fields() -> dict[str, Any]:
    """The fields every event recorded here shares (a copy)."""
    return dict(_scope.get() or {})


@contextlib.contextmanager
def audit_scope(**fields: Any) -> Iterator[None]:
    """Every audit event recorded inside (in this context) carries ``fields`` unless it names its own."""
    token = _scope.set({**(_scope.get() or {}), **fields})
    try:
        yield
    finally:
        _scope.reset(token)
