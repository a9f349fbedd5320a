"""Dynamic batch size, hedging and limits learned from headers keep every row exactly once.

The runs use ``dfbatch.aprocess`` on ``benchmarks.simapi.VirtualClockLoop``: fn's sleeps are
simulated time, so the order of calls (and so which calls fail) is the same on every run.
"""

from __future__ import annotations

import asyncio

import polars as pl

import dfbatch
from benchmarks.simapi import run
from dfbatch.config import BatchConfig
from dfbatch.errors import RetryableError
from dfbatch.events import BatchStarted, fold
from dfbatch.execute._headers import parse_headers
from dfbatch.execute._limits import Cost, Outcome
from dfbatch.execute._sizing import BatchSizer
from dfbatch.execute._stack import RunLimits
from tests.fakes import texts

FAST = {"backoff_base": 0.001, "backoff_max": 0.005, "progress": False, "seed": 7}


def _words(ts: list[str]) -> list[int]:
    return [len(t.split()) for t in ts]


def test_dynamic_sizing_shrinks_under_errors() -> None:
    calls = 0

    async def flaky(batch: pl.DataFrame) -> list[str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 3 == 0:
            msg = "upstream timed out"  # size-related: smaller batches might get through
            raise TimeoutError(msg)
        return batch["text"].to_list()

    df = texts(400)
    out = run(dfbatch.aprocess(df, flaky, encoding=_words, agents=2, dynamic_batching=True,
                               max_attempts=10, **FAST))
    assert out["output"].to_list() == df["text"].to_list()
    sizes = out.group_by("run_batch_id").len()["len"]
    assert sizes.max() <= 4 and (sizes == 2).sum() > 0  # shrank to the minimum of 2
    assert out["run_batch_id"].n_unique() > 100  # smaller batches than the plan's 100


def test_dynamic_sizing_ignores_errors_unrelated_to_size() -> None:
    calls = 0

    async def flaky(batch: pl.DataFrame) -> list[str]:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            msg = "503 overloaded"
            raise RetryableError(msg)
        return batch["text"].to_list()

    out = run(dfbatch.aprocess(texts(400), flaky, encoding=_words, agents=2,
                               dynamic_batching=True, max_attempts=10, **FAST))
    assert out["error"].is_null().all()
    assert (out.group_by("run_batch_id").len()["len"] == 4).all()  # 503s did not shrink them
    assert out["run_batch_id"].to_list() == out["batch_id"].to_list()


def test_dynamic_sizing_grows_when_request_rate_binds() -> None:
    async def fn(batch: pl.DataFrame) -> list[str]:
        await asyncio.sleep(0.001)
        return batch["text"].to_list()

    df = texts(600)
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, rpm=1200, rate_burst=0.01,
                               dynamic_batching=True, **FAST))
    assert out["output"].to_list() == df["text"].to_list()
    assert out["error"].is_null().all()
    sizes = out.group_by("run_batch_id").len()["len"]
    assert sizes.max() > 4  # merged pending batches once RPM was the binding limit
    assert sizes.sum() == 600 and out["run_batch_id"].n_unique() < 150


def test_rate_bound_growth_stops_at_the_size_that_finishes_the_queue_soonest() -> None:
    clock = [0.0]
    sizer = BatchSizer(initial=4, clock=lambda: clock[0], rate_bound=True, queued_rows=800.0)
    sent: list[tuple[float, int]] = []  # (when, rows) of calls in flight: 0.5 s per row

    def send(n: int) -> None:
        for _ in range(n):  # 2 requests a second, each of the target's size
            clock[0] += 0.5
            sent.append((clock[0], sizer.target))
            sent.sort(key=lambda c: c[0] + 0.5 * c[1])
            while sent and sent[0][0] + 0.5 * sent[0][1] <= clock[0]:
                sizer.observe(ok=True, latency_s=clock[0] - sent.pop(0)[0])

    send(400)
    # sqrt(800 rows / (2 requests/s * 0.5 s/row)) = 28: not the cap of 64
    assert 20 <= sizer.target <= 32 and sizer.rate_best() <= 32
    sizer.queued_rows = 50.0  # the queue drains: the last calls are made short again
    send(100)
    assert sizer.target <= 8
    sizer.rate_bound = False  # a spell where the rate does not bind: its answers are dropped
    sizer.observe(ok=True, latency_s=1.0)
    sizer.rate_bound = True
    assert sizer.rate_best() == sizer.rate_bound_items  # nothing measured since


def test_rate_bound_run_ends_with_short_calls() -> None:
    async def fn(batch: pl.DataFrame) -> list[str]:
        await asyncio.sleep(0.5 * len(batch))  # latency in proportion to the rows
        return batch["text"].to_list()

    df = texts(1200)
    events: list = []
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, rpm=120, rate_burst=0.01,
                               on_event=events.append, **FAST))
    assert out["output"].to_list() == df["text"].to_list()
    starts = sorted((e.t, e.rows) for e in events if isinstance(e, BatchStarted))
    biggest = max(rows for _, rows in starts)
    assert 8 < biggest <= 40  # grew (the rate binds), but not to the cap of 64 rows a call
    assert max(rows for _, rows in starts[-6:]) < biggest  # the last calls are shorter
    assert events[-1].t - events[0].t < 65  # growing to the cap: 72.9 s


def test_dynamic_sizing_respects_token_limit() -> None:
    async def fn(batch: pl.DataFrame) -> list[int]:
        return [len(batch)] * len(batch)

    df = texts(600)
    out = run(dfbatch.aprocess(df, fn, encoding=_words, agents=2, rpm=1200, rate_burst=0.01,
                               dynamic_batching=True, token_limit=40, **FAST))
    per_batch = out.group_by("run_batch_id").agg(pl.col("n_tokens").sum())
    assert per_batch["n_tokens"].max() <= 40


def test_hedging_keeps_one_answer_per_row() -> None:
    seen: dict[int, int] = {}

    async def straggly(batch: pl.DataFrame) -> list[int]:
        first = batch["id"][0]
        seen[first] = seen.get(first, 0) + 1
        slow = first % 40 == 36 and first > 200 and seen[first] == 1  # a few first tries hang
        await asyncio.sleep(20.0 if slow else 0.005)
        return (batch["id"] * 2).to_list()

    events: list = []
    df = pl.DataFrame({"id": range(400), "text": ["same size"] * 400})  # runs in id order
    out = run(dfbatch.aprocess(df, straggly, encoding=_words, agents=2, hedge_after=0.9,
                               on_event=events.append, **FAST))
    assert events[-1].t - events[0].t < 10.0  # the 20 s stragglers did not set the makespan
    assert out["output"].to_list() == (df["id"] * 2).to_list()
    stats = fold(events)
    assert stats.hedges >= 1 and stats.rows_done == 400


def test_limits_learned_from_headers() -> None:
    async def learn(limits: RunLimits, headers: dict[str, str]) -> None:
        await limits.shared.acquire(Cost(tokens=10))
        limits.shared.release(Cost(tokens=10), Outcome(hints=parse_headers(headers)))

    limits = RunLimits.from_config(BatchConfig(), n_agents=2)
    assert limits.rpm is not None and not limits.rpm.known  # unknown until headers say
    asyncio.run(learn(limits, {"X-RateLimit-Limit-Requests": "600",
                               "x-ratelimit-limit-tokens": "90000"}))
    assert limits.rpm.per_minute == 600
    assert limits.tpm is not None and limits.tpm.per_minute == 90000
    assert limits.rpm in limits.shared.limits and limits.tpm in limits.shared.limits
    configured = RunLimits.from_config(BatchConfig(rpm=100), n_agents=2)
    asyncio.run(learn(configured, {"x-ratelimit-limit-requests": "600"}))
    assert configured.rpm is not None and configured.rpm.per_minute == 100  # user wins
