"""A live view's counts of the calls in flight: kept by the pool, read at snapshot time."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import polars as pl
import pytest

import dfbatch
import dfbatch.display
from dfbatch.events import BatchRetried, Event, RunFinished, RunStarted, RunStats, fold
from dfbatch.execute import _usage
from dfbatch.execute._recorder import Answered, Recorder
from dfbatch.execute._scheduler import Batch
from dfbatch.run import _prepare


def test_a_snapshot_mid_run_shows_each_agents_calls_in_flight_and_the_oldest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fakes import RecordingView

    accs: list[Any] = []

    class Kept(_prepare.StatsAccumulator):  # type: ignore[misc]
        def __post_init__(self) -> None:
            super().__post_init__()
            accs.append(self)

    monkeypatch.setattr(_prepare, "StatsAccumulator", Kept)
    monkeypatch.setattr(dfbatch.display, "open_display", lambda progress, **kw: RecordingView())
    mid: list[tuple[float, RunStats, RunStats]] = []
    gate: asyncio.Event | None = None
    first: list[float] = []
    events: list[Event] = []

    async def fn(batch: pl.DataFrame) -> list[int]:
        nonlocal gate
        loop = asyncio.get_running_loop()
        gate = gate or asyncio.Event()
        first.append(loop.time())
        if len(first) < 3:  # the first two calls wait for the third
            await gate.wait()
        elif len(first) == 3:  # three calls in flight
            now = loop.time()
            mid.append((now - first[0], accs[0].snapshot(now), fold(events, now)))
            gate.set()
        return batch["id"].to_list()

    df = pl.DataFrame({"id": range(12), "text": [f"t{i}" for i in range(12)]})
    out = dfbatch.process(df, fn, items_per_batch=2, agents=3, progress="bar",
                          on_event=events.append)
    assert out["output"].to_list() == list(range(12))
    age, s, told = mid[0]
    assert s.in_flight == 3 and s.calls == 3 and s.rows_done == 0
    assert [(a.in_flight, a.inflight_tokens) for a in s.agents] == [
        (a.in_flight, a.inflight_tokens) for a in told.agents]  # as the events say
    assert sum(a.inflight_tokens for a in s.agents) > 0
    assert age <= s.oldest_in_flight_s == told.oldest_in_flight_s  # the first call's age
    assert s == told
    end = accs[0].snapshot()
    assert (end.in_flight, end.calls, end.rows_done, end.oldest_in_flight_s) == (0, 6, 12, 0.0)
    assert all(a.inflight_tokens == 0 for a in end.agents)
    assert end == fold(events)


def _batches(n: int) -> list[Batch]:
    return [Batch(i, i % 2, np.arange(4 * i, 4 * i + 4), 40, 100, at=4 * i) for i in range(n)]


def test_the_pools_calls_count_as_the_events_would() -> None:
    """Starts, a retry, a hedge, a bisection, a failure, answers: the tally that reads the
    recorder's calls in flight agrees with the events the recorder emits, between any two
    steps."""

    async def run() -> None:
        acc = dfbatch.events.StatsAccumulator()
        events: list[Event] = []
        start = RunStarted(0.0, 16, 4, 160, (80, 80))
        acc.apply(start)
        events.append(start)
        rec = Recorder(16, None)
        rec.listen(acc, events.append)
        b = _batches(4)
        loop = asyncio.get_running_loop()
        ok = Answered([None] * 4, None, 0.0, 0.001, _usage.Usage(3, 2))

        def same() -> None:
            now = loop.time()
            assert acc.snapshot(now) == fold(events, now)

        rec.started(0, b[0], 1, loop.time())
        rec.started(1, b[1], 1, loop.time())
        same()
        rec.event(b[0], BatchRetried(loop.time(), 0, 0, 40, 1, 0.1, "boom", rate_limited=True))
        same()
        rec.started(0, b[0], 2, loop.time())
        rec.started(0, b[2], 1, loop.time())  # (two calls of one agent: a test's liberty)
        rec.answered(1, b[1], ok)
        same()
        from dfbatch.events import BatchHedged
        rec.event(b[2], BatchHedged(loop.time(), 2, 0))
        rec.bisected(0, b[2], "too big", 0.2)
        rec.answered(0, b[0], ok)
        same()
        rec.started(1, b[3], 1, loop.time())
        rec.failed(1, b[3], "bad", 0.0, 0.3)
        same()
        for _ in range(3):
            rec.started(1, b[3], 1, loop.time())
            rec.answered(1, b[3], ok)
        rec.started(0, b[0], 3, loop.time())  # stopped: never ends
        same()
        end = RunFinished(loop.time(), cancelled=True)
        acc.apply(end)
        events.append(end)
        same()
        s = acc.snapshot()
        assert (s.in_flight, s.calls, s.hedges, s.retries) == (0, 10, 1, 1)

    asyncio.run(run())


def test_a_batch_failed_without_a_call_is_not_a_call_in_flight() -> None:
    """A batch too big to send fails without a start: nothing in flight goes below zero."""

    async def run() -> RunStats:
        acc = dfbatch.events.StatsAccumulator()
        acc.apply(RunStarted(0.0, 8, 2, 80, (80,)))
        rec = Recorder(8, None)
        rec.listen(acc, None)
        b = _batches(2)
        rec.started(0, b[1], 1, asyncio.get_running_loop().time())
        rec.failed(0, b[0], "too big", 0.0, 0.0)
        return acc.snapshot()

    s = asyncio.run(run())
    assert (s.in_flight, s.agents[0].in_flight, s.calls, s.errors) == (1, 1, 1, 1)
