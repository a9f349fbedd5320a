"""The emit -> stats -> display wiring of a run: open the live view, refresh it from the
folded ``RunStats`` a few times a second, and never let a display break the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Callable
from typing import Any

from dfbatch.config import Progress
from dfbatch.events import BatchRetried, Event, LiveCalls, RunStats, StatsAccumulator

REFRESH_S = 0.25


def open_display(progress: Progress, total: int, stop: Callable[[], None] | None) -> Any:
    """The live view; its Stop button calls ``stop`` on the run's loop, whichever thread
    delivers the click (a blocking notebook cell pumps clicks on its own thread)."""
    if progress is False:
        return None
    from dfbatch.display import open_display as open_view

    return open_view(progress, total_rows=total, stop=None if stop is None else on_loop(stop))


def on_loop(stop: Callable[[], None]) -> Callable[[], None]:
    """``stop``, called on the running loop from any thread."""
    loop = asyncio.get_running_loop()

    def soon() -> None:
        with contextlib.suppress(RuntimeError):  # the run's loop closed: nothing to stop
            loop.call_soon_threadsafe(stop)

    return soon


async def tick(display: Any, acc: StatsAccumulator) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(REFRESH_S)
        safe(display.update, acc.snapshot(loop.time()))


class ChunkTally:
    """A streamed run's counts of one chunk's pool (into the run's ``acc``), which also set
    ``drained`` once the pool's queues are empty (the next chunk's pool may start)."""

    __slots__ = ("acc", "drained", "queued")

    def __init__(self, acc: StatsAccumulator, queued: Callable[[], int],
                 drained: asyncio.Event) -> None:
        self.acc, self.queued, self.drained = acc, queued, drained

    def watch(self, live: LiveCalls) -> Callable[[], None]:
        self.acc.watch(live)
        return self._check  # at every call's start and answer

    def _check(self) -> None:
        if not self.queued():
            self.drained.set()

    def drain(self) -> None:
        self.acc.drain()

    def call_failed(self, t: float, agent_id: int, rows: int, tokens: int, elapsed_s: float,
                    *, bisected: bool = False, called: bool = True) -> None:
        self.acc.call_failed(t, agent_id, rows, tokens, elapsed_s, bisected=bisected,
                             called=called)
        self._check()

    def call_retried(self, ev: BatchRetried) -> None:
        self.acc.call_retried(ev)
        self._check()

    def apply(self, ev: Event) -> None:
        self.acc.apply(ev)
        self._check()


def safe(method: Callable[[RunStats], None], stats: RunStats) -> None:
    try:
        method(stats)
    except Exception as exc:  # a display must never break the run
        warnings.warn(f"progress display failed: {exc!r}", RuntimeWarning, stacklevel=2)

