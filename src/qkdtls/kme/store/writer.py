"""One dedicated thread that runs a store's transactions, so the event loop never waits for an fsync.

Hand-written instead of ``ThreadPoolExecutor``: a batch is one call and one wake-up of the loop
(``call_soon_threadsafe``), without the executor's work items and chained futures, which cost more CPU than
the batch's own SQL at the commit rates of a busy KME.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"] | None


class WriterThread:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, loop, future = job
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting coroutine, never lost here
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            try:
                loop.call_soon_threadsafe(_settle, future, outcome)
            except RuntimeError:  # the loop closed while the call ran: nobody is waiting any more
                pass

    def submit(self, func: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``func``; the future resolves with its outcome. Cancelling the future does not stop it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((func, loop, future))
        return future

    async def call(self, func: Callable[[], T]) -> T:
        return await self.submit(func)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued calls, then end the thread (bounded wait)."""
        self._jobs.put(None)
        self._thread.join(timeout)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
