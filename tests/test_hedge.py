"""Tail defenses: size-aware hedging on a budget, no hedge on a binding TPM, adaptive timeout.

The runs use ``benchmarks.simapi.run`` (a virtual-clock loop): fn's sleeps are simulated time,
so makespans are exact and the runs are deterministic.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import polars as pl
import pytest

import dfbatch
from benchmarks.simapi import run
from dfbatch.config import BatchConfig
from dfbatch.errors import ConfigError, RetryableError
from dfbatch.events import BatchFinished, BatchHedged, BatchRetried, BatchStarted, fold
from dfbatch.execute._hedge import TIMEOUT_FLOOR_S, TailState, has_room, race
from dfbatch.execute._latency import drain_ratio, restart_ratio
from dfbatch.execute._limits import CapacityLimit, Cost

FAST = {"progress": False, "seed": 7, "backoff_base": 0.001, "backoff_max": 0.005}


def _words(ts: list[str]) -> list[int]:
    return [len(t.split()) for t in ts]


def _frame(n: int, words: int = 10) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [" ".join(["w"] * words)] * n})


class Straggly:
    """1 s per call; the first call of each batch whose first id is in ``slow`` takes
    ``slow_s``. Counts calls per first id and answers ``id * 2``."""

    def __init__(self, slow: set[int], slow_s: float = 100.0, base_s: float = 1.0) -> None:
        self.slow, self.slow_s, self.base_s = slow, slow_s, base_s
        self.calls: Counter[int] = Counter()

    async def __call__(self, batch: pl.DataFrame) -> list[int]:
        first = batch["id"][0]
        self.calls[first] += 1
        slow = first in self.slow and self.calls[first] == 1
        await asyncio.sleep(self.slow_s if slow else self.base_s * (1 + 0.05 * (first % 5)))
        return (batch["id"] * 2).to_list()


def _once(out: pl.DataFrame, df: pl.DataFrame) -> None:
    """Every row answered exactly once, with its own answer."""
    assert out["id"].to_list() == df["id"].to_list()
    assert out["error"].is_null().all()
    assert out["output"].to_list() == (df["id"] * 2).to_list()


def test_straggler_of_ordinary_size_is_hedged_and_the_run_ends_early() -> None:
    df = _frame(400)
    fn = Straggly(slow={380})  # a batch near the end hangs for 100 s on its first try
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, on_event=events.append,
                               **FAST))
    _once(out, df)
    assert fold(events).hedges >= 1
    assert events[-1].t - events[0].t < 30  # not the 100 s straggler's

    off_events: list = []
    out = run(dfbatch.aprocess(df, Straggly(slow={380}), encoding=_words, agents=2,
                               hedge_after=None, on_event=off_events.append, **FAST))
    _once(out, df)
    assert fold(off_events).hedges == 0
    assert off_events[-1].t - off_events[0].t >= 100  # opted out: the straggler sets it


def test_big_request_with_proportional_latency_is_not_hedged() -> None:
    # 200 small rows (10 tokens, ~0.06 s) and 20 big ones (1000-2900 tokens, 1-3 s, in
    # proportion). Half the big rows fail once with retry_after=20: their second try runs in
    # the run's tail, long after the model has seen big calls, where a size-blind quantile
    # (everything slower than 90% of calls) would hedge every one of them.
    small = [" ".join(["w"] * 10)] * 200
    big = [" ".join(["w"] * (1000 + 100 * i)) for i in range(20)]
    df = pl.DataFrame({"id": range(220), "text": small + big})
    tries: Counter[int] = Counter()

    async def proportional(batch: pl.DataFrame) -> list[int]:
        i, tokens = batch["id"][0], sum(_words(batch["text"].to_list()))
        tries[i] += 1
        if i >= 200 and i % 2 == 0 and tries[i] == 1:
            msg = "busy"
            raise RetryableError(msg, retry_after=20.0)
        jitter = 1 + 0.2 * (i % 5) / 4 if tokens < 100 else 1.0
        await asyncio.sleep((0.05 + 0.001 * tokens) * jitter)
        return (batch["id"] * 2).to_list()

    events: list = []
    out = run(dfbatch.aprocess(df, proportional, encoding=_words, agents=2, items_per_batch=1,
                               hedge_after=0.9, dynamic_batching=False,
                               on_event=events.append, **FAST))
    _once(out, df)
    late_big = [e for e in events if isinstance(e, BatchStarted) and e.tokens >= 1000
                and e.attempt == 2]
    assert len(late_big) == 10 and min(e.t for e in late_big) >= 20  # in the tail, model fitted
    assert not [e for e in events if isinstance(e, BatchHedged)]


def test_budget_caps_extra_calls() -> None:
    df = _frame(800)
    slow = set(range(0, 800, 12))  # a third of the batches straggle on their first try
    for budget in (0.05, 0.0):
        fn = Straggly(slow=slow, slow_s=30.0)
        events: list = []
        out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, hedge_budget=budget,
                                   on_event=events.append, **FAST))
        _once(out, df)
        attempts = sum(isinstance(e, BatchStarted) for e in events)
        hedges = fold(events).hedges
        restarts = [e for e in events if isinstance(e, BatchRetried) and "resent" in e.error]
        # hedges and restarts together: at most the budget (a short run: at least 2 hedges)
        assert hedges + len(restarts) <= max(budget * attempts, 2 if budget else 0)
        assert hedges >= (1 if budget else 0)


def test_hedges_keep_a_reserve_for_the_runs_last_calls() -> None:
    state = TailState(attempts=100)  # 5% of 100: 5 extra calls
    hedge = {"queued": False, "rates": (), "units": ()}
    state.running = 30  # a hedge now would leave nothing for the calls that finish last
    assert not state.may_hedge(0.05, **hedge) and state.hedges == 0
    state.running = 9  # 1 + 8 / 2 kept for the 8 others: within 5
    assert state.may_hedge(0.05, **hedge) and state.hedges == 1
    assert not state.may_hedge(0.05, **hedge)  # 2 + 4 > 5
    state.running = 1  # the last call
    assert all(state.may_hedge(0.05, **hedge) for _ in range(4)) and state.hedges == 5
    assert not state.may_hedge(0.05, **hedge)  # never past the budget
    short = TailState(attempts=10)  # a short run's 2 spare hedges go to its last calls too
    short.running = 4
    assert not short.may_hedge(0.05, **hedge)
    short.running = 3
    assert short.may_hedge(0.05, **hedge)
    rng = random.Random(1)
    for sigma in (0.35, 1.0):  # a light tail or a heavy one: the reserve holds for both
        fitted = TailState(attempts=100)
        for _ in range(256):
            fitted.observe(100, max(0.5, rng.lognormvariate(0.0, sigma)))
        fitted.running = 30  # under a heavy tail too, the last few calls need the budget
        assert not fitted.may_hedge(0.05, **hedge)
        fitted.running = 9
        assert fitted.may_hedge(0.05, **hedge)


def test_no_hedge_while_a_binding_tpm_has_queued_work() -> None:
    df = _frame(400)  # 100 batches of 40 tokens; 1200 TPM = 30 batches a minute: TPM binds
    fn = Straggly(slow={40, 120, 200, 380}, slow_s=500.0)
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, tpm=1200, rate_burst=0.05,
                               dynamic_batching=False, on_event=events.append, **FAST))
    _once(out, df)
    first_tries = [e.t for e in events if isinstance(e, BatchStarted) and e.attempt == 1]
    last_start = max(first_tries)  # the queue is empty from here on
    hedged = [e.t for e in events if isinstance(e, BatchHedged)]
    assert all(t >= last_start for t in hedged)
    cut = [e for e in events if isinstance(e, BatchRetried) and "StragglerTimeout" in e.error]
    assert len(cut) >= 1  # the mid-run stragglers were cut and retried instead
    assert events[-1].t - events[0].t < 500


def test_adaptive_timeout_cuts_a_hang_and_retries_it() -> None:
    df = _frame(200)
    fn = Straggly(slow={100}, slow_s=1000.0, base_s=0.01)
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, hedge_budget=0.0,
                               timeout=900.0, on_event=events.append, **FAST))
    _once(out, df)
    cut = [e for e in events if isinstance(e, BatchRetried) and "StragglerTimeout" in e.error]
    assert len(cut) == 1 and fold(events).hedges == 0
    started = next(e.t for e in events if isinstance(e, BatchStarted) and e.batch_id
                   == cut[0].batch_id)
    assert TIMEOUT_FLOOR_S <= cut[0].t - started < 10  # the floor, not 900 s or 1000 s
    assert fn.calls[100] == 2


def test_plan_is_size_aware_and_never_under_the_floor() -> None:
    state = TailState()
    for i in range(64):
        tokens = 100 if i % 2 else 10_000
        state.observe(tokens, 0.01 + 0.0001 * tokens * (1 + 0.01 * (i % 7)))
    small, big = state.plan(100, 0.9), state.plan(10_000, 0.9)
    assert small is not None and big is not None
    assert small.tail_after < 0.1 < 1.0 < big.tail_after  # a 1 s big call is not late
    assert small.outlier_after >= small.tail_after
    assert small.deadline >= TIMEOUT_FLOOR_S and small.stall_after >= TIMEOUT_FLOOR_S
    assert big.deadline > big.outlier_after


def test_hedge_settings() -> None:
    assert BatchConfig().hedge_after == 0.9 and BatchConfig().hedge_budget == 0.05
    assert BatchConfig(hedge_after=False).hedge_after is None
    assert BatchConfig(hedge_after=True).hedge_after == 0.9
    with pytest.raises(ConfigError, match="hedge_budget"):
        BatchConfig(hedge_budget=1.5)
    with pytest.raises(ConfigError, match="hedge_after"):
        BatchConfig(hedge_after=2.0)


def test_a_few_slow_calls_in_a_sparse_size_bucket_do_not_tilt_the_line() -> None:
    # 250 calls of ~900 tokens at ~3 s, and 6 of ~1100 tokens that happened to be slow (the
    # slow ones finish last): the line must not make a 900-token call "expected" at 60 s
    state = TailState()
    for i in range(250):
        state.observe(850 + i % 100, 3.0 * (1 + 0.2 * (i % 5)))
    for i in range(6):
        state.observe(1100 + i, 20.0)
    assert state.model.expected(900) < 6.0


def test_a_timeout_of_an_ordinary_size_is_a_hang() -> None:
    state = TailState()
    assert not state.ordinary_within(100, 4.0)  # nothing seen: cannot tell
    for _ in range(2):
        state.observe(100, 1.0)
    assert state.ordinary_within(100, 4.0) and not state.ordinary_within(100, 1.0)
    assert not state.ordinary_within(1000, 4.0)  # 10x bigger than anything seen
    for i in range(40):
        state.observe(100 + 10 * (i % 4), 1.0 + 0.05 * (i % 5))
    assert state.ordinary_within(120, 4.0)
    assert not state.ordinary_within(120, 1.1)  # its own size's calls take about that long
    assert not state.ordinary_within(120, None)


class Hangs:
    """0.2 s per call; the first call of the batches in ``hang`` (first ids) never returns."""

    def __init__(self, hang: set[int]) -> None:
        self.hang, self.calls = hang, Counter[int]()

    async def __call__(self, batch: pl.DataFrame) -> list[int]:
        first = batch["id"][0]
        self.calls[first] += 1
        await asyncio.sleep(10_000 if first in self.hang and self.calls[first] == 1 else 0.2)
        return (batch["id"] * 2).to_list()


def test_a_hang_shrinks_neither_the_batches_nor_the_concurrency() -> None:
    df = _frame(4000)
    events: list = []
    fn = Hangs(hang={200, 204, 208})  # 3 of 16 calls in a row: not a size problem
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, timeout=2.0,
                               hedge_after=None, on_event=events.append, **FAST))
    _once(out, df)
    sizes = [e.rows for e in events if isinstance(e, BatchStarted)]
    assert fn.calls[204] == 2 and min(sizes) == max(sizes)  # no batch shrank
    starts = sorted(e.t for e in events if isinstance(e, BatchStarted))
    after = [t for t in starts if 2.5 < t - starts[0] < 4.5]  # the two seconds after the hang
    before = [t for t in starts if 0.2 < t - starts[0] < 2.2]
    assert len(after) >= 0.8 * len(before)  # the concurrency was not halved


def test_race_adds_no_task_to_a_call_that_is_not_hedged() -> None:
    state = TailState()
    for _ in range(40):
        state.observe(100, 1.0)
    tasks: list[int] = []

    async def call() -> str:
        tasks.append(len(asyncio.all_tasks()))
        await asyncio.sleep(0.5)
        tasks.append(len(asyncio.all_tasks()))
        return "first"

    async def hedge() -> str:
        msg = "no hedge for a call this fast"
        raise AssertionError(msg)

    async def go() -> str:
        return await race(call, hedge, lambda: state.plan(100, 0.9), queued=lambda: False,
                          may_hedge=lambda q: True)

    assert run(go()) == "first"
    assert tasks == [1, 1]  # the caller's task only


def test_race_hedge_wins_and_the_first_copy_is_cancelled() -> None:
    state = TailState()
    for _ in range(40):
        state.observe(100, 1.0)
    cancelled: list[bool] = []

    async def call() -> str:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "first"

    async def hedge() -> str:
        await asyncio.sleep(1.0)
        return "hedge"

    async def go() -> tuple[str, float, int]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await race(call, hedge, lambda: state.plan(100, 0.9), queued=lambda: False,
                         may_hedge=lambda q: True)
        task = asyncio.current_task()
        assert task is not None
        return got, loop.time() - t0, task.cancelling()

    got, took, cancelling = run(go())
    assert got == "hedge" and cancelled == [True] and took < 5 and cancelling == 0


# -- restarts (cut and resend) and the run's tail under a heavy-tailed latency ---------------
class Lognormal:
    """Every call (4 rows of 10 tokens) takes ``1 s x lognormal(0, sigma)`` (>= 0.5), a fresh
    draw per call -- or, with ``by_rows``, a draw fixed by the batch's first id (the rows, not
    chance, set the latency: a resend is as slow). Counts calls per first id."""

    def __init__(self, sigma: float, *, by_rows: bool = False, seed: int = 3) -> None:
        self.sigma, self.by_rows, self.seed = sigma, by_rows, seed
        self.rng = random.Random(seed)
        self.calls: Counter[int] = Counter()

    async def __call__(self, batch: pl.DataFrame) -> list[int]:
        first = batch["id"][0]
        self.calls[first] += 1
        rng = random.Random(self.seed * 100_003 + first) if self.by_rows else self.rng
        await asyncio.sleep(max(0.5, rng.lognormvariate(0.0, self.sigma)))
        return (batch["id"] * 2).to_list()


def _restarts(events: list) -> list:
    return [e for e in events if isinstance(e, BatchRetried) and "resent" in e.error]


def _run(fn: Lognormal, n: int = 3200, **settings: object) -> tuple[pl.DataFrame, list, float]:
    df = _frame(n)
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=4, items_per_batch=4,
                               max_concurrent_batches=8, max_in_flight=32,
                               dynamic_batching=False, on_event=events.append,
                               **{**FAST, **settings}))
    _once(out, df)
    return out, events, events[-1].t - events[0].t


def test_heavy_tail_cuts_and_resends_stragglers_within_the_budget() -> None:
    _, events, makespan = _run(Lognormal(1.0))
    restarts, hedges = len(_restarts(events)), fold(events).hedges
    calls = sum(isinstance(e, BatchStarted) for e in events) + hedges
    assert restarts >= 5 and hedges >= 5  # mid-run restarts, hedges in the run's tail
    assert restarts + hedges <= 0.05 * calls  # the stated budget
    assert all(e.delay_s <= 0.06 for e in _restarts(events))  # resent at once
    _, _, plain = _run(Lognormal(1.0), hedge_after=None)
    assert makespan < 0.9 * plain  # (0.82 x here)


def test_light_tail_is_never_cut_and_resent() -> None:
    _, events, _ = _run(Lognormal(0.35), n=1600)
    assert not _restarts(events)


def test_restarts_stop_when_a_resend_is_as_slow_as_its_cut_call() -> None:
    fn = Lognormal(1.0, by_rows=True)  # a slow batch is slow on every try
    _, events, _ = _run(fn)
    restarts = _restarts(events)
    per_batch = Counter(e.batch_id for e in restarts)
    assert per_batch and max(per_batch.values()) == 1  # a batch is cut and resent once
    # the resends come back as slow as their cut calls (the rows set the latency): once two
    # have, no call is cut again (those cut before that were sent while none had answered)
    answered = sorted(e.t for e in events
                      if isinstance(e, BatchFinished) and e.batch_id in per_batch)
    assert len(answered) == len(per_batch) and len(per_batch) <= 8
    assert all(e.t < answered[1] for e in restarts)


def test_tail_state_restart_bookkeeping() -> None:
    state = TailState()
    rng = random.Random(1)
    for _ in range(256):
        state.observe(100, max(0.5, rng.lognormvariate(0.0, 1.0)))
    plan = state.plan(100, 0.9, budget=0.05)
    assert plan is not None and 3.0 < plan.restart_after < 10.0  # ~ its 96th percentile
    assert plan.tail_after < state.plan(100, 0.9).outlier_after
    assert state.plan(100, 0.9).restart_after == math.inf  # no budget: no restart
    state.attempts = 1000
    batch, other = object(), object()
    assert state.may_restart(0.05, batch, 100, 6.0)
    assert not state.may_restart(0.05, batch, 100, 6.0)  # once per batch
    state.running = 32
    state.restarts = 34  # 34 + this one + 32 / 2 kept for the tail's hedges > 5% of 1000
    assert not state.may_restart(0.05, other, 100, 6.0)
    state.running, state.restarts = 0, 1
    for slow in (batch, other):  # both resends as slow as the cut calls: no more restarts
        state._cut[id(slow)] = (slow, 6.0)
        state.observe(100, 7.0, slow)
    assert not state.restart_ok
    after = state.plan(100, 0.9, budget=0.05)
    assert after is not None and after.restart_after == math.inf


def test_restart_and_drain_ages_follow_the_tail_shape() -> None:
    assert 4.0 < restart_ratio(0.0, 1.0, 0.96) < 8.0  # heavy: resend at the 96th percentile
    assert restart_ratio(0.0, 0.35, 0.96) == math.inf  # light: a resend only loses time
    assert drain_ratio(0.0, 1.0) <= 1.0  # heavy: a copy beats a call past its median
    assert drain_ratio(0.0, 0.5) == math.inf


def test_has_room() -> None:
    slots = CapacityLimit(2)
    assert has_room([slots])
    slots.try_acquire(Cost())
    slots.try_acquire(Cost())
    assert not has_room([slots]) and has_room([])


def test_races_share_one_timer_and_each_is_hedged_at_its_own_age() -> None:
    """Every race of a loop wakes from one heap (``Wakes``): concurrent stragglers of
    different sizes are each hedged at their own size's age, a fast call is not, and a race
    that ended keeps none of its closures alive (its heap entry outlives it)."""
    import gc
    import weakref

    state = TailState()
    for i in range(64):
        state.observe(100 + 900 * (i % 2), 0.5 + 0.001 * (100 + 900 * (i % 2)))
    hedged: dict[str, float] = {}

    class Big:  # stands for the batch's frame that the closures hold
        pass

    async def go() -> tuple[list[str], bool]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def one(name: str, tokens: int, takes: float) -> asyncio.Task[str]:
            frame = Big()

            async def call() -> str:
                await asyncio.sleep(takes)
                return f"{name}:{id(frame) > 0}"

            async def hedge() -> str:
                hedged[name] = loop.time() - t0
                await asyncio.sleep(0.01)
                return f"{name}:hedge"

            refs.append(weakref.ref(frame))
            return asyncio.ensure_future(race(call, hedge, lambda: state.plan(tokens, 0.9),
                                              queued=lambda: False, may_hedge=lambda q: True))

        refs: list[weakref.ref[Big]] = []
        tasks = [one("small", 100, 50.0), one("big", 1000, 50.0), one("fast", 100, 0.1)]
        got = await asyncio.gather(*tasks)
        del tasks
        gc.collect()
        return got, all(r() is None for r in refs)

    got, freed = run(go())
    assert got == ["small:hedge", "big:hedge", "fast:True"]
    assert "fast" not in hedged and hedged["small"] < hedged["big"]
    assert freed


def test_a_race_that_re_arms_later_does_not_delay_one_due_sooner() -> None:
    """``Wakes`` fires for the earliest entry; a race that re-adds itself far ahead while the
    timer fires must not push back an entry already in the heap that is due sooner."""
    from dfbatch.execute._hedge import Wakes

    woke: dict[str, float] = {}
    holder: list[Wakes] = []

    class Fake:  # what Wakes reads of a race
        def __init__(self, name: str, again: float | None) -> None:
            self.name, self.again, self.closed, self.t0 = name, again, False, 0.0

        def _decide(self) -> None:
            now = asyncio.get_running_loop().time()
            woke.setdefault(self.name, now)
            if self.again is not None:
                holder[0].add(now + self.again, self)  # type: ignore[arg-type]
                self.again = None

    async def go() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        holder.append(wakes := Wakes(loop))
        wakes.add(t0 + 1.0, Fake("first", again=10.0))  # type: ignore[arg-type]
        wakes.add(t0 + 1.5, Fake("second", again=None))  # type: ignore[arg-type]
        await asyncio.sleep(20)
        return t0

    t0 = run(go())
    assert woke["first"] - t0 == pytest.approx(1.0, abs=0.01)
    assert woke["second"] - t0 == pytest.approx(1.5, abs=0.01)  # not 11 s (the re-armed one)


def test_pending_builds_a_race_only_for_a_call_that_gets_late() -> None:
    """``Pending`` (a caller's calls in flight): a call that ends before any plan could act
    costs no race; a late one gets its race then, and is hedged at its own size's age as if
    it had been raced from its start."""
    from dfbatch.execute._race import Pending, Race, first_decision

    state = TailState()
    for i in range(64):
        state.observe(100 + 900 * (i % 2), 0.5 + 0.001 * (100 + 900 * (i % 2)))
    made: list[str] = []
    hedged: dict[str, float] = {}

    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def make(task: asyncio.Task[str], started: float, args: tuple[str, int]) -> Race[str]:
            name, tokens = args
            made.append(name)

            async def hedge() -> str:
                hedged[name] = loop.time() - t0
                await asyncio.sleep(0.01)
                return f"{name}:hedge"

            return Race(loop, task, started, hedge, lambda: state.plan(tokens, 0.9),
                        lambda: False, lambda q: True)

        pending = Pending(loop, lambda: first_decision(state.plan(0, 0.9), lambda: False), make)

        async def one(name: str, tokens: int, takes: float) -> str:
            task = asyncio.current_task()
            assert task is not None
            pending.add(task, (name, tokens))
            try:
                await asyncio.sleep(takes)
            except asyncio.CancelledError as exc:
                race_ = pending.end(task)
                assert race_ is not None and not race_.after_error(exc)
                race_.close()
                return race_.outcome()
            race_ = pending.end(task)
            if race_ is not None:
                assert race_.close() is None
            return name

        return list(await asyncio.gather(
            *(one(f"fast{i}", 100, 0.1 + 0.01 * i) for i in range(20)),
            one("small", 100, 50.0), one("big", 1000, 50.0)))

    got = run(go())
    assert got == [f"fast{i}" for i in range(20)] + ["small:hedge", "big:hedge"]
    assert sorted(made) == ["big", "small"]  # no race for the calls that ended in time
    plan_small, plan_big = state.plan(100, 0.9), state.plan(1000, 0.9)
    assert plan_small is not None and plan_big is not None
    assert hedged["small"] == pytest.approx(plan_small.tail_after, abs=0.01)
    assert hedged["big"] == pytest.approx(plan_big.tail_after, abs=0.01)


def test_a_run_builds_races_only_for_its_late_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's calls under ``hedge_after`` cost no race each: one is built only for a
    call late enough for a decision (here the straggler, which is still hedged)."""
    from dfbatch.execute._caller import FnCaller

    built: list[int] = []
    make = FnCaller._race

    def counting(self: FnCaller, task: asyncio.Task[object], t0: float, args: tuple) -> object:
        built.append(args[1].id)  # (the batch's id)
        return make(self, task, t0, args)

    monkeypatch.setattr(FnCaller, "_race", counting)
    fn = Straggly({1200})
    df = _frame(1600)
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=4, items_per_batch=4,
                               max_concurrent_batches=8, max_in_flight=32,
                               dynamic_batching=False, on_event=events.append, **FAST))
    _once(out, df)
    assert fn.calls[1200] == 2 and fold(events).hedges >= 1  # the straggler was hedged
    # before the model is fitted every call is polled; after, mid-run, only the straggler
    # (of 400 calls) gets a race
    assert 16 <= len(built) <= 80
    assert [b for b in built if 64 <= b < 350] == [300]  # (batch ids: 4 rows each)
