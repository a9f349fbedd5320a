"""Dynamic batch sizing must still isolate a poison row (bisection must not be undone).

Runs on ``benchmarks.simapi.VirtualClockLoop`` with a deadline in simulated time, so a livelock
fails in a fraction of a second instead of hanging the suite.
"""

from __future__ import annotations

import asyncio

import polars as pl

import dfbatch
from benchmarks.simapi import SimError, run


def test_dynamic_sizing_still_isolates_poison_rows() -> None:
    df = pl.DataFrame({"id": range(200), "text": ["x"] * 200})
    poison = {13, 77, 150}
    calls: list[list[int]] = []

    async def fn(batch: pl.DataFrame) -> list[int]:
        ids = batch["id"].to_list()
        calls.append(ids)
        await asyncio.sleep(0.1)
        if poison & set(ids):
            msg = "invalid input"
            raise SimError(400, msg)
        return ids

    async def go() -> pl.DataFrame:
        job = dfbatch.aprocess(df, fn, encoding=lambda ts: [1] * len(ts), agents=2,
                               dynamic_batching=True, progress=False)
        return await asyncio.wait_for(job, timeout=30.0)  # simulated s (a run takes ~1)

    out = run(go())
    failed = out.filter(pl.col("error").is_not_null())["id"].to_list()
    assert failed == sorted(poison)  # the poison rows alone; their batch-mates succeeded
    assert out.filter(pl.col("error").is_null())["output"].to_list() == [
        i for i in range(200) if i not in poison]
    assert all([p] in calls for p in poison)
