"""dfbatch's own cost per batch: a no-op fn, dfbatch.process versus bare asyncio.gather.

Run: ``.venv/bin/python benchmarks/overhead_bench.py`` (~20 s on 2 cores). Options: ``--rows``,
``--items``, ``--repeat``, ``--profile N`` (cProfile dfbatch's run, print the top N functions).

Both sides run the same no-op ``async def fn(batch)`` (it yields to the loop once, like any fn
that awaits something, and returns one value per row; ``--no-yield``: it never yields) over the
same batches of ``--items`` rows:

- ``bare``: the batches pre-sliced into ``pl.DataFrame`` objects up front (not timed), then
  ``asyncio.gather`` over them under an ``asyncio.Semaphore`` of dfbatch's global in-flight cap.
- ``bare + df[positions]``: as ``bare``, but each batch is cut out of the frame inside the task
  with ``df[np.ndarray of row positions]``, as the pool does: the share of slicing.
- ``dfbatch (planned)``: ``dfbatch.process(planned, fn, progress=False)`` on a frame that already
  carries its plan: limits, agents, slicing, events, outcomes and the result frame.
- ``plan``: ``dfbatch.plan`` alone (token counting with a cheap callable + packing + balancing).
- ``dfbatch (from scratch)``: ``process`` on the unplanned frame with the same cheap tokenizer.

Per-batch overhead = (dfbatch time - bare time) / batches; ratio = dfbatch time / bare time.
``--no-hedge`` runs with ``hedge_after=None`` (every call then skips the hedging race).

Where the microseconds go (issue 16, py-spy samples of runs of 100k rows with the defaults,
shares of the pool's run, a no-op that yields once): the limit stack ~23 % (agent bytes,
in-flight, AIMD, the RPM and TPM buckets -- unknown until headers state them, so they only log
each charge -- the pause and the breaker's pass, all taken by one ``Grant`` without a coroutine
when nothing waits; the warm-up leaves the stack once warm), the call of fn ~12 % (usage, the
binding and ``Watch`` in one coroutine; hedging is one entry in the caller's ``Pending`` under
one timer, a ``Race`` only for a call late enough for a decision), the answer ~10 % (outputs
checked, the limits' outcome, the latency model), the scheduler's ``take`` ~8 % (queues read
128 batches ahead), the zero-copy ``frame.slice`` ~8 %, recording ~5 % (a tuple per batch,
written to the per-row arrays in bulk), per-run setup and assembly ~10 %. Gone since the start
of issue 16: ``frame[positions]`` per batch (batches are slices of the frame reordered once),
one ``pl.Series`` per batch, events nobody listens to, a task per batch (an agent's workers
keep its slot), three ``async with`` per attempt (bytes, limits, breaker), a generator-based
context manager per attempt, ``asyncio.timeout`` per call, a hedge race per call (its object,
seven closures, a plan and a heap entry), four coroutine layers per call (``_attempt``,
``race``, ``_call_bound``, ``Watch.run``), five numpy writes per batch, a latency fit in pure
Python every 16 calls, frozen dataclasses built per call, an unknown rate limit's bucket math.
Best of ``--repeat`` runs (the least disturbed by other processes on a shared machine), in CPU
seconds of the process (``--wall`` for wall seconds: everything here runs on one thread).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfbatch
from dfbatch.config import BatchConfig

_ZEROS = {n: [0] * n for n in range(1, 65)}


YIELD = True  # the no-op yields once (as any real awaiting fn does); --no-yield: not


async def noop(batch: pl.DataFrame) -> list[int]:
    if YIELD:
        await asyncio.sleep(0)
    return _ZEROS[batch.height]


def cheap_tokens(texts: list[str]) -> list[int]:
    return [1] * len(texts)


def frame(rows: int) -> pl.DataFrame:
    return pl.DataFrame({"id": range(rows), "text": [f"row {i}" for i in range(rows)]})


EXTRA: dict[str, Any] = {}


def settings(items: int) -> dict[str, Any]:
    return {"items_per_batch": items, "encoding": cheap_tokens, "progress": False, **EXTRA}


async def bare(batches: list[pl.DataFrame], cap: int) -> list[list[int]]:
    sem = asyncio.Semaphore(cap)

    async def one(b: pl.DataFrame) -> list[int]:
        async with sem:
            return await noop(b)

    return await asyncio.gather(*(one(b) for b in batches))


async def bare_slicing(df: pl.DataFrame, rows: list[np.ndarray], cap: int) -> list[list[int]]:
    """As ``bare``, but each batch is cut out of the frame by row positions, as the pool does."""
    sem = asyncio.Semaphore(cap)

    async def one(r: np.ndarray) -> list[int]:
        async with sem:
            return await noop(df[r])

    return await asyncio.gather(*(one(r) for r in rows))


CLOCK = time.process_time  # CPU seconds of this process: steadier than wall time when shared


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


def profile(planned: pl.DataFrame, items: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    dfbatch.process(planned, noop, **settings(items))
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="N")
    p.add_argument("--wall", action="store_true", help="time wall seconds, not CPU seconds")
    p.add_argument("--no-hedge", action="store_true", help="run with hedge_after=None")
    p.add_argument("--no-yield", action="store_true", help="a no-op that never yields")
    a = p.parse_args(argv)
    global CLOCK, YIELD
    YIELD = not a.no_yield
    if a.wall:
        CLOCK = time.perf_counter
    if a.no_hedge:
        EXTRA["hedge_after"] = None
    df = frame(a.rows)
    planned = dfbatch.plan(df, encoding=cheap_tokens, items_per_batch=a.items)
    n_batches = planned["batch_id"].n_unique()
    cap = BatchConfig().in_flight_cap
    sliced = [df[i:i + a.items] for i in range(0, a.rows, a.items)]
    positions = [np.arange(i, min(a.rows, i + a.items)) for i in range(0, a.rows, a.items)]
    out = dfbatch.process(planned, noop, **settings(a.items))
    assert out["error"].is_null().all() and out.height == a.rows

    t_bare = best_of(a.repeat, lambda: asyncio.run(bare(sliced, cap)))
    t_slicing = best_of(a.repeat, lambda: asyncio.run(bare_slicing(df, positions, cap)))
    t_planned = best_of(a.repeat, lambda: dfbatch.process(planned, noop, **settings(a.items)))
    t_plan = best_of(a.repeat, lambda: dfbatch.plan(df, encoding=cheap_tokens,
                                                    items_per_batch=a.items))
    t_full = best_of(a.repeat, lambda: dfbatch.process(df, noop, **settings(a.items)))

    print(f"{a.rows} rows, {n_batches} batches of {a.items}, in-flight cap {cap}, "
          f"best of {a.repeat}")
    print(f"{'':24} {'total s':>8} {'us/batch':>9} {'overhead us/batch':>18} {'ratio':>6}")
    for name, t in (("bare gather+Semaphore", t_bare), ("bare + df[positions]", t_slicing),
                    ("dfbatch (planned)", t_planned), ("plan only", t_plan),
                    ("dfbatch (from scratch)", t_full)):
        per = t / n_batches * 1e6
        vs_bare = not name.startswith(("plan", "bare gather"))
        extra = (t - t_bare) / n_batches * 1e6 if vs_bare else float("nan")
        ratio = t / t_bare if vs_bare else float("nan")
        print(f"{name:24} {t:8.3f} {per:9.1f} {extra:18.1f} {ratio:6.2f}")
    if a.profile:
        print(profile(planned, a.items, a.profile))


if __name__ == "__main__":
    main()
