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
from dfbatch.events import Event, RunStats, StatsAccumulator

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

    def batch_started(self, t: float, batch_id: int, agent_id: int, tokens: int) -> None:
        self.acc.batch_started(t, batch_id, agent_id, tokens)
        if not self.queued():
            self.drained.set()

    def batch_finished(self, t: float, batch_id: int, agent_id: int, planned_agent: int,
                       rows: int, tokens: int, elapsed_s: float, ok_rows: int, error_rows: int,
                       input_tokens: int = 0, output_tokens: int = 0) -> None:
        self.acc.batch_finished(t, batch_id, agent_id, planned_agent, rows, tokens, elapsed_s,
                                ok_rows, error_rows, input_tokens, output_tokens)
        if not self.queued():
            self.drained.set()

    def batch_failed(self, t: float, batch_id: int, agent_id: int, rows: int, tokens: int,
                     elapsed_s: float, *, bisected: bool = False) -> None:
        self.acc.batch_failed(t, batch_id, agent_id, rows, tokens, elapsed_s, bisected=bisected)
        if not self.queued():
            self.drained.set()

    def apply(self, ev: Event) -> None:
        self.acc.apply(ev)
        if not self.queued():
            self.drained.set()


def safe(method: Callable[[RunStats], None], stats: RunStats) -> None:
    try:
        method(stats)
    except Exception as exc:  # a display must never break the run
        warnings.warn(f"progress display failed: {exc!r}", RuntimeWarning, stacklevel=2)

