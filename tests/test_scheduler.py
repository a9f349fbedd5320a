"""The scheduler by plain calls, and the pool with a fake caller on a virtual clock (no sleeps).

The pool tests plug a ``FakeCaller`` in through the engine seam (``Pool(engine=...)``): each
call "takes" a scripted number of simulated seconds on ``benchmarks.simapi.VirtualClockLoop``,
so makespans and orders are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pytest

from benchmarks.simapi import run
from dfbatch.config import BatchConfig
from dfbatch.errors import RetryableError
from dfbatch.events import BatchFailed, BatchStarted, Event
from dfbatch.execute import _usage
from dfbatch.execute._caller import Reporter
from dfbatch.execute._limits import CapacityLimit, Cost, Hold
from dfbatch.execute._pool import Pool
from dfbatch.execute._recorder import Answered, GaveUp, Verdict
from dfbatch.execute._scheduler import Batch, Batches, Scheduler
from dfbatch.execute._sizing import BatchSizer
from dfbatch.execute._stack import RunLimits

CFG = BatchConfig(request_overhead_tokens=0, output_tokens_per_row=0, token_limit=100)


def _batch(bid: int, rows: range, agent: int = 0, tokens_per_row: int = 10) -> Batch:
    r = np.arange(rows.start, rows.stop)
    return Batch(bid, agent, r, tokens_per_row * len(r), 0)


def _sched(batches: list[list[Batch]], cfg: BatchConfig = CFG, **kw: Any) -> Scheduler:
    n = 1 + max((int(b.rows.max()) for q in batches for b in q), default=0)
    return Scheduler(batches, cfg, row_tokens=np.full(n, 10), **kw)


# -- the scheduler: plain calls --------------------------------------------------------------
def test_heaviest_first_then_steal_from_the_most_loaded_agent() -> None:
    a0 = [_batch(0, range(0, 2)), _batch(1, range(2, 6)), _batch(2, range(6, 9))]
    a1 = [_batch(3, range(9, 10), agent=1)]
    s = _sched([a0, a1, []])
    assert [s.take(0).id, s.take(1).id] == [1, 3]  # type: ignore[union-attr]
    assert s.take(2).id == 2  # type: ignore[union-attr]  # agent 2 steals agent 0's heaviest
    assert s.take(1).id == 0  # type: ignore[union-attr]
    assert s.take(0) is None and not s.queued() and s.pending == 4


def test_batches_come_heaviest_first_across_the_blocks_read_ahead() -> None:
    """The queues read the next batches' fields a block at a time: every batch comes out once,
    heaviest first, with requeued ones ahead of the block being handed out."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 9, 300).tolist()
    batches = [_batch(i, range(i, i + 1), tokens_per_row=t) for i, t in enumerate(tokens)]
    s = _sched([batches], CFG.replace(token_limit=1000))
    first = s.take(0)
    assert first is not None
    s.requeue(0, s.halves(_batch(999, range(0, 2))))  # (new ids: 300, 301)
    got = [s.take(0) for _ in range(301)]
    ids = [b.id for b in got if b is not None]
    assert ids[:2] == [300, 301] and s.take(0) is None  # the halves, then the planned ones
    planned = [first.id, *ids[2:]]
    assert planned == sorted(range(300), key=lambda i: (-tokens[i], i))
    assert all(b.rows.tolist() == [b.id] and b.at == -1 for b in got[2:] if b is not None)
    # contiguous batches (no row array held): each one's rows are its own range
    sizes = rng.integers(1, 5, 300)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    spans = [_batch(i, range(a, a + int(k)))
             for i, (a, k) in enumerate(zip(starts, sizes, strict=True))]
    c = Scheduler(Batches.of([spans]).contiguous(), CFG.replace(token_limit=1000),
                  row_tokens=np.full(int(sizes.sum()), 10))
    taken = [c.take(0) for _ in range(300)]
    assert sorted(b.id for b in taken if b) == list(range(300))
    assert all(b.at == starts[b.id] and b.rows.tolist() == list(range(b.at, b.at + sizes[b.id]))
               for b in taken if b)


def test_no_stealing_when_steal_is_off() -> None:
    s = _sched([[_batch(0, range(0, 2))], []], CFG.replace(steal=False))
    assert s.take(1) is None and s.take(0) is not None


def test_finished_counts_down_to_all_done() -> None:
    s = _sched([[_batch(0, range(0, 2)), _batch(1, range(2, 4))]])
    s.take(0)
    s.take(0)
    assert (s.finished(), s.finished()) == (False, True)


def test_oversize_batches_split_before_sending_and_a_lone_row_fails() -> None:
    changes: list[int] = []
    s = _sched([[_batch(0, range(0, 12))]], on_change=lambda: changes.append(1))
    big = s.take(0)
    assert big is not None and s.oversize(0, big) == ""  # 120 tokens > 100: split in halves
    halves = [s.take(0), s.take(0)]
    assert [(h.id, len(h.rows), h.frozen) for h in halves if h] == [(1, 6, True), (2, 6, True)]
    assert changes and s.pending == 3  # the split batch and its two halves
    lone = Batch(9, 0, np.arange(1), tokens=500, nbytes=0)
    assert "token_limit=100" in (s.oversize(0, lone) or "")
    assert s.oversize(0, Batch(9, 0, np.arange(1), 500, 0, call_anyway=True)) is None


def test_dynamic_target_merges_and_splits_pending_batches() -> None:
    sizer = BatchSizer(initial=2)
    batches = [_batch(i, range(2 * i, 2 * i + 2)) for i in range(4)]
    s = _sched([batches], sizer=sizer)
    sizer.target = 4  # grown: the next batch absorbs the one behind it
    merged = s.take(0)
    assert merged is not None and merged.rows.tolist() == [0, 1, 2, 3] and merged.id == 4
    assert s.pending == 3  # two batches became one
    sizer.target = 1  # shrunk: the next batch is split, the rest goes back to the front
    one = s.take(0)
    assert one is not None and len(one.rows) == 1 and s.queues[0][0].rows.tolist() == [5]


def test_merging_stops_at_the_token_limit() -> None:
    sizer = BatchSizer(initial=2)
    s = _sched([[_batch(i, range(4 * i, 4 * i + 4)) for i in range(4)]], sizer=sizer)
    sizer.target = 16
    b = s.take(0)
    assert b is not None and b.tokens <= CFG.token_limit and len(b.rows) == 8


def test_the_sizer_learns_the_rows_not_yet_sent_at_each_take() -> None:
    sizer = BatchSizer(initial=2)
    s = _sched([[_batch(i, range(2 * i, 2 * i + 2)) for i in range(3)],
                [_batch(3 + i, range(6 + 2 * i, 8 + 2 * i), agent=1) for i in range(2)]],
               sizer=sizer)
    s.take(0)
    assert sizer.queued_rows == 10  # every row: the batch taken is not sent yet
    s.take(1)
    assert sizer.queued_rows == 8  # the first batch went out
    sizer.target = 4
    s.take(0)  # merges two batches: counted before the merge
    assert sizer.queued_rows == 6 and not s.queues[0]


# -- the pool, with a fake caller on a virtual clock -----------------------------------------
class FakeCaller:
    """Each call takes ``latency(batch)`` simulated seconds; ``verdict(batch)`` decides."""

    def __init__(self, report: Reporter, latency: Callable[[Batch], float],
                 verdict: Callable[[Batch], str | None]) -> None:
        self.report, self.latency, self.verdict = report, latency, verdict
        self.calls: list[tuple[float, int, list[int]]] = []

    async def open(self) -> None:
        return None

    def close(self) -> list[int]:
        return []

    async def call(self, a: int, batch: Batch, df: pl.DataFrame, slot: Hold) -> Verdict:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.calls.append((t0, a, batch.rows.tolist()))
        self.report.started(a, batch, 1, t0)
        await asyncio.sleep(self.latency(batch))
        error = self.verdict(batch)
        if error is not None:
            return GaveUp(error, True, 0.0, loop.time() - t0)
        return Answered(df.select(output=pl.col("id")), None, 0.0, loop.time() - t0,
                        _usage.Usage())


class FakeEngine:
    rates_elsewhere = False

    def __init__(self, latency: Callable[[Batch], float] = lambda b: 1.0,
                 verdict: Callable[[Batch], str | None] = lambda b: None) -> None:
        self.latency, self.verdict = latency, verdict
        self.callers: list[FakeCaller] = []

    def caller(self, fn: Any, cfg: BatchConfig, limits: RunLimits, report: Reporter, *,
               reserved: set[str], queued: Callable[[], bool]) -> FakeCaller:
        self.callers.append(FakeCaller(report, self.latency, self.verdict))
        return self.callers[-1]


def _pool(batches: list[list[Batch]], engine: Any, cfg: BatchConfig = CFG,
          events: list[Event] | None = None, limits: RunLimits | None = None) -> Pool:
    n = 1 + max(int(b.rows.max()) for q in batches for b in q)
    frame = pl.DataFrame({"id": range(n)})
    sink = events.append if events is not None else (lambda e: None)
    return Pool(lambda b: None, frame, batches, cfg, row_tokens=np.full(n, 10), emit=sink,
                reserved=set(), engine=engine, limits=limits)


def test_an_idle_agent_steals_and_halves_the_makespan() -> None:
    batches = [[_batch(i, range(i, i + 1)) for i in range(8)], []]
    cfg = CFG.replace(max_concurrent_batches=1)

    async def main(steal: bool) -> tuple[float, set[int]]:
        engine = FakeEngine()
        pool = _pool(batches, engine, cfg.replace(steal=steal))
        t0 = asyncio.get_running_loop().time()
        out = await pool.run()
        assert out.done.all()
        return asyncio.get_running_loop().time() - t0, {a for _, a, _ in engine.callers[0].calls}

    alone, agents = run(main(False))
    assert alone == pytest.approx(8.0, abs=1e-3) and agents == {0}
    shared, agents = run(main(True))
    assert shared == pytest.approx(4.0, abs=1e-3) and agents == {0, 1}


def test_a_failed_batch_is_bisected_until_the_poison_row_fails_alone() -> None:
    events: list[Event] = []
    engine = FakeEngine(verdict=lambda b: "FatalError: bad row" if 5 in b.rows else None)
    pool = _pool([[_batch(0, range(0, 8))]], engine, events=events)
    out = run(pool.run())
    assert out.done.all()
    assert [i for i, e in enumerate(out.errors) if e] == [5]
    calls = [rows for _, _, rows in engine.callers[0].calls]
    assert calls[0] == list(range(8)) and [5] in calls and len(calls) == 7  # 1 + 2 + 2 + 2
    bisected = [e for e in events if isinstance(e, BatchFailed) and e.bisected]
    assert len(bisected) == 3


def test_concurrency_cap_per_agent_on_the_virtual_clock() -> None:
    batches = [[_batch(i, range(i, i + 1)) for i in range(6)]]
    events: list[Event] = []
    pool = _pool(batches, FakeEngine(), CFG.replace(max_concurrent_batches=2), events=events)
    run(pool.run())
    starts = sorted(round(e.t) for e in events if isinstance(e, BatchStarted))
    assert starts == [0, 0, 1, 1, 2, 2]


# -- slots: held once, released once ----------------------------------------------------------
class CountingSlots(CapacityLimit):
    """A concurrency limit that counts grants and releases, and sets ``blocked`` at the
    ``signal_at``-th acquire that has to wait."""

    def __init__(self, capacity: int, signal_at: int) -> None:
        super().__init__(capacity)
        self.released = self.granted = self.waits = 0
        self.signal_at = signal_at
        self.blocked = asyncio.Event()

    async def acquire(self, cost: Cost) -> None:
        if self.in_use >= self.capacity:
            self.waits += 1
            if self.waits == self.signal_at:
                self.blocked.set()
        await super().acquire(cost)
        self.granted += 1

    def try_acquire(self, cost: Cost) -> bool:
        got = super().try_acquire(cost)
        self.granted += got
        return got

    def release(self, cost: Cost, outcome: Any = None) -> None:
        self.released += 1
        super().release(cost, outcome)


def test_cancelled_while_reacquiring_the_slot_after_a_backoff_releases_it_once() -> None:
    """Batch 0 fails once and sleeps off its retry; batch 1 takes the agent's only slot and
    hangs; batch 0 queues to get its slot back and the run is cancelled right then."""
    cfg = BatchConfig(max_concurrent_batches=1, backoff_base=0.5, backoff_max=0.5, seed=1)
    calls: list[int] = []

    async def fn(batch: pl.DataFrame) -> list[int]:
        ids = batch["id"].to_list()
        calls.append(ids[0])
        if ids[0] == 1:
            await asyncio.sleep(3600)
        if calls.count(0) == 1 and ids[0] == 0:
            msg = "503 busy"
            raise RetryableError(msg)
        return ids

    async def main() -> CountingSlots:
        frame = pl.DataFrame({"id": [0, 1]})
        limits = RunLimits.from_config(cfg, 1)
        # the one wait: batch 0 back from its backoff (the agent takes free slots unwaited)
        slots = limits.agent_slots[0] = CountingSlots(1, signal_at=1)
        batches = [[Batch(0, 0, np.array([0]), 9, 0), Batch(1, 0, np.array([1]), 1, 0)]]
        pool = Pool(fn, frame, batches, cfg, row_tokens=np.ones(2), emit=lambda e: None,
                    reserved=set(), limits=limits)
        task = asyncio.create_task(pool.run())
        await slots.blocked.wait()  # batch 0, back from its backoff, waits for its slot
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return slots

    slots = run(main())
    assert calls[:2] == [0, 1]
    assert slots.in_use == 0 and slots.released == slots.granted  # never released twice


# -- workers: a slot passes from batch to batch, and to whoever waits for it -------------------
def test_a_slot_given_back_for_a_backoff_runs_other_batches_meanwhile() -> None:
    """Batch 0 sleeps off a retry without its agent's only slot: batches 1..3 use it then, and
    batch 0 gets it back when it is free."""

    class Backoff(FakeCaller):
        async def call(self, a: int, batch: Batch, df: pl.DataFrame, slot: Hold) -> Verdict:
            if batch.id != 0:
                return await super().call(a, batch, df, slot)
            loop = asyncio.get_running_loop()
            self.report.started(a, batch, 1, loop.time())
            slot.release()
            await asyncio.sleep(2.5)
            await slot.reacquire()
            self.calls.append((loop.time(), a, batch.rows.tolist()))
            self.report.started(a, batch, 2, loop.time())
            return Answered(df.select(output=pl.col("id")), None, 0.0, 0.0, _usage.Usage())

    class Engine(FakeEngine):
        def caller(self, fn: Any, cfg: BatchConfig, limits: RunLimits, report: Reporter, *,
                   reserved: set[str], queued: Callable[[], bool]) -> FakeCaller:
            self.callers.append(Backoff(report, self.latency, self.verdict))
            return self.callers[-1]

    engine = Engine()
    batches = [[_batch(i, range(i, i + 1), tokens_per_row=10 - i) for i in range(4)]]
    out = run(_pool(batches, engine, CFG.replace(max_concurrent_batches=1)).run())
    assert out.done.all() and out.attempts.tolist() == [2, 1, 1, 1]
    starts = {rows[0]: round(t, 3) for t, _, rows in engine.callers[0].calls}
    assert starts == {1: 0.0, 2: 1.0, 3: 2.0, 0: 3.0}  # 0: back at 2.5, its slot free at 3


def test_pools_sharing_their_agents_slots_take_turns_and_both_finish() -> None:
    """Two pools on one ``RunLimits`` (a streamed run's chunks): the second waits for the
    agent's only slot while the first's worker holds it, and gets it when that worker passes
    it on."""
    limits = RunLimits.from_config(CFG.replace(max_concurrent_batches=1), 1)
    engine = FakeEngine()
    first = _pool([[_batch(i, range(i, i + 1)) for i in range(3)]], engine, limits=limits)
    second = _pool([[_batch(i, range(i, i + 1)) for i in range(3)]], engine, limits=limits)

    async def main() -> list[Any]:
        return list(await asyncio.gather(first.run(), second.run()))

    outs = run(main())
    assert all(o.done.all() for o in outs)
    ends = [max(t for t, _, _ in c.calls) for c in engine.callers]
    assert sorted(round(e) for e in ends) == [4, 5]  # one slot: six calls one after another


def test_slots_another_pool_gives_up_reach_a_pool_that_already_runs() -> None:
    """A streamed run's next chunk starts while the last one's batches hold the agent's slots:
    as those end, the next pool gets every slot (its workers keep theirs across batches, so
    only a slot given up by the other pool can raise its concurrency)."""
    limits = RunLimits.from_config(CFG.replace(max_concurrent_batches=4), 1)
    engine = FakeEngine(latency=lambda b: {1: 2.0, 2: 3.0, 3: 10.0}.get(b.id, 1.0))
    last = _pool([[_batch(i, range(i, i + 1)) for i in range(4)]], engine, limits=limits)
    nxt = _pool([[_batch(100 + i, range(i, i + 1)) for i in range(12)]], engine,
                limits=limits)

    async def main() -> float:
        first = asyncio.create_task(last.run())
        await asyncio.sleep(0.5)  # every slot held by the last chunk's calls
        out = await nxt.run()
        assert out.done.all()
        await first
        return asyncio.get_running_loop().time()

    end = run(main())
    # slots free at t=1, 2, 3 (the fourth at t=10): 12 calls of 1 s end at t=6 (5 + 4 + 3)
    assert end == pytest.approx(10.0, abs=1e-3)
    assert max(t for t, _, _ in engine.callers[1].calls) == pytest.approx(5.0, abs=1e-3)


def test_rows_of_a_batch_stopped_in_flight_keep_its_attempts() -> None:
    engine = FakeEngine(latency=lambda b: 1.0 if b.id == 0 else 1e6)
    pool = _pool([[_batch(0, range(0, 2)), _batch(1, range(2, 5))]], engine,
                 CFG.replace(max_concurrent_batches=2))

    async def main() -> Any:
        task = asyncio.create_task(pool.run())
        await asyncio.sleep(2.0)
        pool.stop()
        return await task

    out = run(main())
    assert out.attempts.tolist() == [1] * 5
    assert out.done.tolist() == [True, True, False, False, False]
    assert list(out.errors) == [None, None, "cancelled", "cancelled", "cancelled"]
