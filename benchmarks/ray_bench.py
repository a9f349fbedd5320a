"""What running on Ray costs per batch: engine="ray" versus engine="asyncio" on the same plan.

Run: ``.venv/bin/python benchmarks/ray_bench.py`` (starts a local Ray with ``--cpus`` CPUs, or
joins ``RAY_ADDRESS``).
Options: ``--batches 400``, ``--latency 0.05`` (seconds fn sleeps per batch), ``--agents 4``.

fn is an async sleep, so the work is the same in both engines and the difference is dfbatch's
and Ray's overhead: actor start-up (measured apart: a run of one batch per agent), then per
batch one shipped Arrow table and a streamed reply (started / outcome / done). Printed: the
makespan of each engine, the ratio to asyncio, and the Ray run's extra time per batch beyond
actor start-up.
Also printed: a run with ``rpm`` set, so every call leases from the limiter actor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import polars as pl

import dfbatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    t0 = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):  # join that cluster
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")

    latency = args.latency

    async def fn(batch: pl.DataFrame) -> list[str]:
        await asyncio.sleep(latency)
        return batch["text"].to_list()

    n = args.batches * 4
    df = pl.DataFrame({"text": [f"row {i}" for i in range(n)]})
    kw = {"encoding": lambda ts: [2] * len(ts), "agents": args.agents, "progress": False}

    def timed(**extra: object) -> float:
        t = time.perf_counter()
        dfbatch.process(df, fn, **kw, **extra)  # type: ignore[arg-type]
        return time.perf_counter() - t

    small = df.head(4 * args.agents)
    t = time.perf_counter()
    dfbatch.process(small, fn, engine="ray", **kw)  # type: ignore[arg-type]
    start_s = time.perf_counter() - t
    local = timed()
    remote = timed(engine="ray")
    limited = timed(engine="ray", rpm=600_000)  # a limit that never binds: leases only
    per_batch = max(0.0, remote - start_s - local) / args.batches * 1000
    print(f"batches: {args.batches}, fn latency {latency * 1000:.0f} ms, agents {args.agents}")
    print(f"asyncio engine: {local:.2f} s")
    print(f"ray engine:     {remote:.2f} s  (x{remote / local:.2f} asyncio), of which actor "
          f"start-up ~{start_s:.2f} s; beyond both, ~{per_batch:.2f} ms per batch")
    print(f"ray + rpm:      {limited:.2f} s  (x{limited / remote:.2f} ray without rpm)")
    ray.shutdown()


if __name__ == "__main__":
    main()
