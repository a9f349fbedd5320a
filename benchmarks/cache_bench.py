"""The response cache: lookup throughput, and a fully cached rerun against the run that filled it.

1. ``--lookup-rows`` rows (default 1M) are written to a fresh cache, then looked up and decoded
   as a run does (keys, SQLite join, Arrow decode): rows/s.
2. A run of ``--run-rows`` rows (default 100k) through an async fn that waits ``--latency-s``
   per batch (a stand-in for an API), filling the cache; then the same run again, fully cached.
   The ratio is rerun time / first run time (the issue asks for < 5%).

The load average is printed first: on a shared machine the figures move with it.

    .venv/bin/python benchmarks/cache_bench.py [--lookup-rows 1000000] [--run-rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import polars as pl

import dfbatch
from dfbatch.config import BatchConfig
from dfbatch.persist._cache_run import CacheRun, namespace


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [f"row {i} of the benchmark" for i in range(n)]})


def fn(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.to_uppercase()


fn.dfbatch_fingerprint = {"bench": 1}  # type: ignore[attr-defined]


def lookup(n: int, folder: Path) -> None:
    df, cfg = frame(n), BatchConfig()
    cache = dfbatch.Cache(folder / "lookup.sqlite", max_size=None)
    run = CacheRun(cache, namespace(fn, "text", cfg), None, cfg, cache_errors=False,
                   refresh=False)
    run.lookup(df)
    t0 = time.perf_counter()
    step = 10_000
    for s in range(0, n, step):
        rows = run.todo[s:s + step]
        run._queue.put((rows, fn(df[rows]).to_frame("output"), [None] * len(rows)))
    run._start()
    run.close()
    fill = time.perf_counter() - t0
    run2 = CacheRun(cache, namespace(fn, "text", cfg), None, cfg, cache_errors=False,
                    refresh=False)
    t0 = time.perf_counter()
    hits = run2.lookup(df)
    took = time.perf_counter() - t0
    assert len(hits) == n and sum(t.num_rows for _, t in run2._pieces) == n
    size = (folder / "lookup.sqlite").stat().st_size
    print(f"fill   {n:,} rows: {fill:.2f} s ({n / fill:,.0f} rows/s), file {size / 2**20:.0f} MiB")
    print(f"lookup {n:,} rows: {took:.2f} s ({n / took:,.0f} rows/s; keys, SQLite and "
          "Arrow decode; target >= 200,000 rows/s)")


def rerun(n: int, latency: float, folder: Path) -> None:
    async def api(batch: pl.DataFrame) -> pl.Series:
        await asyncio.sleep(latency)
        return batch["text"].str.to_uppercase()

    api.dfbatch_fingerprint = {"bench": "api"}  # type: ignore[attr-defined]
    df, path = frame(n), folder / "run.sqlite"
    kw = dict(progress=False, items_per_batch=50, max_in_flight=256, agents=4)
    t0 = time.perf_counter()
    dfbatch.process(df, api, cache=path, **kw)  # type: ignore[arg-type]
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = dfbatch.process(df, api, cache=path, **kw)  # type: ignore[arg-type]
    second = time.perf_counter() - t0
    assert out["cached"].all()
    print(f"run {n:,} rows ({latency * 1000:.0f} ms per batch of 50): first {first:.2f} s, "
          f"fully cached rerun {second:.2f} s = {second / first:.1%} of the first (target < 5%)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lookup-rows", type=int, default=1_000_000)
    p.add_argument("--run-rows", type=int, default=100_000)
    p.add_argument("--latency-s", type=float, default=0.5)
    a = p.parse_args()
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as d:
        lookup(a.lookup_rows, Path(d))
        rerun(a.run_rows, a.latency_s, Path(d))


if __name__ == "__main__":
    main()
