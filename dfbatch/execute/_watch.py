"""The configured per-call timeout of many concurrent calls, kept by one timer.

``asyncio.timeout`` arms (and cancels) a timer per call: at thousands of cheap calls a second,
that is a good share of dfbatch's own cost. Every call of a run has the same timeout, so their
deadlines come in the order the calls started: ``Watch`` keeps the calls in flight in that
order and one timer at the oldest deadline. A call past its deadline is cancelled and raises
``TimeoutError`` (as under ``asyncio.timeout``: a cancel from anyone else stays a cancel). A
deadline is kept to within ``grain`` (2% of the timeout, at least 1 ms): the timer fires at
most once per grain, however many calls expire.

Examples
--------
>>> import asyncio
>>> async def demo():
...     watch = Watch(0.05)
...     fast = await watch.run(asyncio.sleep(0.01, result="answered"))
...     try:
...         await watch.run(asyncio.sleep(10))
...     except TimeoutError:
...         return fast, "timed out"
>>> asyncio.run(demo())
('answered', 'timed out')
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Watch:
    """Run awaitables under one shared ``timeout`` (seconds); see the module docstring."""

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.grain = max(1e-3, self.timeout / 50)
        self._live: dict[asyncio.Task[Any], float] = {}  # in start order = deadline order
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` in this task; ``TimeoutError`` once it has run ``timeout`` seconds."""
        task = asyncio.current_task()
        assert task is not None
        self.start(task)
        try:
            return await aw
        except asyncio.CancelledError:
            if self.timed_out(task):
                raise TimeoutError from None
            raise
        finally:
            self.stop(task)

    def start(self, task: asyncio.Task[Any]) -> None:
        """``task`` starts a call (``run`` without a coroutine, for a hot path: ``start``, then
        on ``CancelledError`` ``timed_out``, and ``stop`` in a ``finally``)."""
        loop = task.get_loop()
        self._live[task] = deadline = loop.time() + self.timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check)

    def timed_out(self, task: asyncio.Task[Any]) -> bool:
        """``task``'s call was cancelled: by our deadline alone (raise ``TimeoutError``)?"""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0  # (else somebody else cancelled it too: a cancel)

    def stop(self, task: asyncio.Task[Any]) -> None:
        """``task``'s call is over; a deadline that passed as it ended takes its cancel back."""
        self._live.pop(task, None)
        if self._expired and task in self._expired:
            self._expired.discard(task)
            task.uncancel()

    def close(self) -> None:
        """The run is over: cancel the timer (a call that starts later arms it again)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        nxt = None
        for task, deadline in self._live.items():
            if deadline > now:
                nxt = deadline
                break
            if task not in self._expired and not task.done():
                self._expired.add(task)
                task.cancel()
        if nxt is not None:
            self._timer = loop.call_at(max(nxt, now + self.grain), self._check)
