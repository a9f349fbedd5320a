"""Synthetic event streams and result frames for the display tests (plus checks of them)."""

from __future__ import annotations

import heapq
import random
from datetime import UTC, datetime, timedelta

import polars as pl

from dfbatch.events import (
    BatchFailed,
    BatchFinished,
    BatchRetried,
    BatchStarted,
    Event,
    RunFinished,
    RunStarted,
    fold,
)


def synthetic_events(
    n_agents: int = 4,
    n_batches: int = 60,
    rows_per_batch: int = 4,
    *,
    concurrency: int = 3,
    p_retry: float = 0.1,
    p_429: float = 0.05,
    p_fail: float = 0.03,
    p_steal: float = 0.15,
    seed: int = 0,
) -> list[Event]:
    """A plausible, consistent event stream: every batch starts, maybe retries, then ends."""
    rng = random.Random(seed)
    tokens = [rng.randint(50, 400) for _ in range(n_batches)]
    planned = [b % n_agents for b in range(n_batches)]
    planned_tokens = tuple(
        sum(t for t, a in zip(tokens, planned, strict=True) if a == i) for i in range(n_agents)
    )
    events: list[Event] = [
        RunStarted(0.0, n_batches * rows_per_batch, n_batches, sum(tokens), planned_tokens)
    ]
    queue = list(range(n_batches))
    rng.shuffle(queue)
    slots = [(0.0, a) for a in range(n_agents) for _ in range(concurrency)]
    heapq.heapify(slots)
    for b in queue:
        t, agent = heapq.heappop(slots)
        if rng.random() >= p_steal:
            agent = planned[b]
        attempt = 1
        while True:
            events.append(BatchStarted(t, b, agent, planned[b], rows_per_batch, tokens[b], attempt))
            dur = rng.uniform(0.2, 1.5)
            t += dur
            limited = rng.random() < p_429
            if (limited or rng.random() < p_retry) and attempt < 3:
                events.append(BatchRetried(t, b, agent, tokens[b], attempt, 0.1, "x", limited))
                attempt += 1
                t += 0.1
                continue
            if rng.random() < p_fail:
                events.append(BatchFailed(t, b, agent, planned[b], rows_per_batch, tokens[b],
                                          dur, "boom"))
            else:
                events.append(BatchFinished(t, b, agent, planned[b], rows_per_batch, tokens[b],
                                            dur, rows_per_batch, 0))
            break
        heapq.heappush(slots, (t, agent))
    events.sort(key=lambda e: (e.t, not isinstance(e, RunStarted)))
    events.append(RunFinished(max(e.t for e in events)))
    return events


def synthetic_result(
    n_agents: int = 5, n_batches: int = 40, rows_per_batch: int = 3, seed: int = 1
) -> pl.DataFrame:
    """A result frame like process() returns, with stolen, retried and failed batches."""
    rng = random.Random(seed)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    clock = [0.0] * n_agents
    rows = []
    for b in range(n_batches):
        planned = b % n_agents
        ran = planned if b % 7 else (planned + 1) % n_agents  # every 7th batch is stolen
        start = clock[ran]
        elapsed = rng.uniform(0.2, 1.0)
        clock[ran] = start + elapsed / 2
        failed = b % 11 == 5
        attempts = 2 if b % 5 == 3 else 1
        for r in range(rows_per_batch):
            rows.append({
                "text": f"row {b}-{r}", "n_tokens": 10 + b + r, "batch_id": b,
                "agent_id": planned, "plan_flag": "ok",
                "output": None if failed else "x", "error": "boom" if failed else None,
                "attempts": attempts, "run_batch_id": b, "run_agent_id": ran,
                "started_at": t0 + timedelta(seconds=start), "elapsed_s": elapsed,
            })
    return pl.DataFrame(rows, schema_overrides={
        "n_tokens": pl.UInt32, "batch_id": pl.UInt32, "agent_id": pl.UInt16,
        "attempts": pl.UInt16, "run_batch_id": pl.UInt32, "run_agent_id": pl.UInt16,
        "started_at": pl.Datetime("us", "UTC"),
    })


def test_synthetic_events_are_consistent() -> None:
    events = synthetic_events(n_agents=3, n_batches=30, seed=3)
    stats = fold(events)
    assert stats.finished
    assert stats.rows_done == stats.total_rows == 120
    assert stats.in_flight == 0
    assert all(a.in_flight == 0 and a.inflight_tokens == 0 for a in stats.agents)
    assert sum(a.done_tokens for a in stats.agents) == stats.total_tokens
    assert stats.batches_done == 30


def test_synthetic_result_has_every_status() -> None:
    r = synthetic_result()
    assert r["error"].null_count() < r.height
    assert (r["run_agent_id"] != r["agent_id"]).any()
    assert (r["attempts"] > 1).any()
