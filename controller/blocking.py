"""Worker threads for the controller's blocking work, off the event loop that carries tunnels.

A store transaction waits for an fsync (milliseconds on a quiet disk, far
more on a busy one) and a certificate takes a CA signature; run on the event
loop, each would stall every tunnel this process relays. They run here
instead, in two small pools, so the HTTP endpoints (enrollment, renewal,
session certificates) and the relay's decisions never wait behind each
other: 500 queued renewals do not delay a dial's decision.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from controller.errors import ControllerError

T = TypeVar("T")
P = ParamSpec("P")

#: Threads for the HTTP endpoints' enrollment, renewal, recovery and session
#: certificates. SQLite commits one writer at a time and Python signs under
#: one interpreter lock, so more threads would only queue inside; two keep a
#: commit's fsync overlapping the next request's CSR checks.
API_WORKERS = 2
#: Threads for the relay's admissions, decisions and audit rows; a tunnel
#: never holds more than one of them at once (RelaySession), so a peer
#: flooding one frame type leaves the other for everybody else.
RELAY_WORKERS = 2
#: HTTP jobs that may wait for an API worker at once. A job is a few
#: milliseconds (a signature and an fsync), so a fleet's burst of a thousand
#: renewals waits seconds at most; past that, "busy, retry" (503, which the
#: agent retries on its own schedule with jitter) costs the controller less
#: than holding every request, its body and its connection in a queue.
MAX_PENDING_API_JOBS = 1000


def busy() -> ControllerError:
    return ControllerError(
        "controller_busy", "The controller is busy with other requests; retry in a few seconds.", 503
    )


class WorkerPool:
    """A bounded thread pool, created on first use, shared by every controller of this process.

    ``max_pending``: jobs ``run`` accepts at once (running and queued); past
    it ``run`` refuses with 503 ``controller_busy`` and starts nothing.
    None: every job queues (the relay, whose tunnels queue one job each).
    """

    def __init__(self, workers: int, name: str, max_pending: int | None = None) -> None:
        self.workers = workers
        self.name = name
        self.max_pending = max_pending
        self.pending = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            return self._executor

    def finish(self) -> None:
        """Wait for the jobs started so far (a process about to exit without its own teardown)."""
        with self._lock:
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` in a worker thread; its result or its exception."""
        # The caller's context (its audit scope, controller/correlation.py) goes along, as with asyncio.to_thread.
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        with self._lock:
            if self.max_pending is not None and self.pending >= self.max_pending:
                raise busy()
            self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor(), call)
        finally:
            with self._lock:
                self.pending -= 1

    def submit(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Start ``function`` in a worker thread from code that cannot await (a callback)."""
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return self.executor().submit(call)


API_POOL = WorkerPool(API_WORKERS, "outpost-api", MAX_PENDING_API_JOBS)
RELAY_POOL = WorkerPool(RELAY_WORKERS, "outpost-relay")

