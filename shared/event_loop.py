"""Which event loop the agent and the controller run on: uvloop where it is installed, asyncio's own otherwise.

uvloop (Debian: python3-uvloop; PyPI: the ``uvloop`` extra) holds an idle TLS
connection in about a fifth of the memory of Python 3.11's asyncio, whose
SSL layer allocates a 256 KiB read buffer per connection (measured in
tests/bench/idle_connections.py, quoted in the README), and costs less CPU
per small message. Plain asyncio stays the tested fallback; ``asyncio``
forces it (the controller's ``--event-loop``, the agent's ``[agent] event_loop``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared.errors import OutpostError

log = logging.getLogger(__name__)

T = TypeVar("T")
#: The TLS layers' read size (asyncio's and uvloop's SSL protocols read 256 KiB at a time): a freed
#: block this large raises glibc's threshold just past such a read and no further, so the heap kept
#: untrimmed (twice the threshold) stays as small as it can.
LARGE_READ_BLOCK = 256 * 1024
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class EventLoopUnavailable(OutpostError):
    """The loop asked for by name is not installed."""


def uvloop_module() -> Any:
    """The uvloop module, or None where it is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def run(main: Coroutine[Any, Any, T], choice: str = "auto", setting: str = "--event-loop {}") -> T:
    """Run ``main`` to completion on the chosen loop (``auto``: uvloop if installed).

    ``setting`` is how the user chooses a loop, ``{}`` for its name, for the
    sentence when uvloop was asked for and is missing.
    """
    uvloop = uvloop_module() if choice != "asyncio" else None
    if uvloop is None and choice == "uvloop":
        main.close()
        raise EventLoopUnavailable(
            f"{setting.format('uvloop')}: uvloop is not installed; install python3-uvloop (or the uvloop extra) "
            f"or use {setting.format('asyncio')}."
        )
    settle_large_reads()
    if uvloop is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def settle_large_reads() -> None:
    """Make a TLS read of 256 KiB come from the heap instead of a fresh mapping.

    The TLS layer reads decrypted bytes into a new 256 KiB ``bytes`` and
    shrinks it to what came: above glibc's initial 128 KiB threshold each such
    buffer is an mmap, an mremap and a munmap, three system calls and a page
    fault per message received (``tests/bench/syscalls.py``). glibc raises its
    threshold to the size of the first mapped block freed (mallopt(3),
    "dynamic mmap threshold"), which the process would otherwise do only by
    chance, after a large read that was not shrunk; this frees one such block
    at start. Elsewhere (another libc) it is one short-lived allocation.
    """
    block = bytearray(LARGE_READ_BLOCK)
    del block


def running_loop_name() -> str:
    """``uvloop 0.17.0`` or ``asyncio``: what the current loop is, for the start-up log line."""
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        uvloop = uvloop_module()
        return f"uvloop {getattr(uvloop, '__version__', '')}".strip()
    return "asyncio"
