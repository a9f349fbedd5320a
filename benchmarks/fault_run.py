"""A 10k-row run through a seeded fault-injecting fake API (issue 3's report).

Run: ``.venv/bin/python benchmarks/fault_run.py [--rows 10000] [--seed 0]``. Prints calls,
retries, rows ok, poison rows failed alone, rows lost / duplicated, and the wall time.
The fake API: latency 5-15 ms, 10% retryable errors with retry_after, 2% hangs past the
timeout, and every 97th row poisoned (a non-retryable 400 for any call that includes it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter

import polars as pl

import dfbatch
from dfbatch.events import fold


class FaultyAPI:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.calls: list[tuple[list[int], str]] = []

    async def __call__(self, batch: pl.DataFrame) -> list[int]:
        ids = batch["id"].to_list()
        roll = self.rng.random()
        await asyncio.sleep(0.005 + 0.01 * self.rng.random())
        if any(i % 97 == 96 for i in ids):
            self.calls.append((ids, "poison"))
            msg = "400 invalid input"
            raise dfbatch.FatalError(msg)
        if roll < 0.10:
            self.calls.append((ids, "retry"))
            msg = "429 slow down"
            raise dfbatch.RetryableError(msg, retry_after=0.05)
        if roll < 0.12:
            self.calls.append((ids, "hang"))
            await asyncio.sleep(60)
        self.calls.append((ids, "ok"))
        return [i * 2 for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    df = pl.DataFrame({"id": range(args.rows), "text": [f"row {i} text" for i in range(args.rows)]})
    api = FaultyAPI(args.seed)
    events: list = []
    t0 = time.perf_counter()
    out = dfbatch.process(df, api, timeout=0.5, backoff_base=0.05, max_attempts=6, seed=args.seed,
                          on_event=events.append, progress=False)
    wall = time.perf_counter() - t0
    stats = fold(events)
    poison = {i for i in range(args.rows) if i % 97 == 96}
    failed = set(out.filter(pl.col("error").is_not_null())["id"].to_list())
    ok = out.filter(pl.col("error").is_null())
    answered = Counter(i for ids, outcome in api.calls if outcome == "ok" for i in ids)
    alone = sum(1 for p in poison if ([p], "poison") in api.calls)
    print(f"rows {args.rows}: calls {stats.calls}, retries {stats.retries}, "
          f"rows ok {ok.height}, rows failed {len(failed)} (poison {len(poison)}, "
          f"failed alone {alone}), good rows failed {len(failed - poison)}")
    print(f"outputs correct: {(ok['output'] == ok['id'] * 2).all()}, rows in result "
          f"{out.height} (lost {args.rows - out['id'].n_unique()}), good rows answered twice "
          f"{sum(1 for i, n in answered.items() if n > 1)}, wall {wall:.1f} s")


if __name__ == "__main__":
    main()
