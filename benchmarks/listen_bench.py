"""What telling listeners of each batch costs the pool: the recorder's per-batch work, alone.

Run: ``.venv/bin/python benchmarks/listen_bench.py`` (~20 s). Options: ``--batches`` (20,000),
``--repeats`` (15, the modes interleaved each time).

The pool's ``Recorder`` is driven directly (``started`` then ``answered`` for each batch of 4
rows, on a running loop) in three modes:

- ``nobody``: ``progress=False`` and no ``on_event``: no listener, nothing is counted or built.
- ``live view``: a dashboard listens: its ``StatsAccumulator`` counts each batch from its fields
  (``batch_started`` / ``batch_finished``), no event object is built.
- ``live view + on_event``: the same, and a subscriber gets a ``BatchStarted`` and a
  ``BatchFinished`` event per batch (frozen dataclasses).

Each line: thread CPU time per batch, best and median of the repeats, and what the mode adds to
``nobody`` (best against best). This is the dashboard's share of ``display_bench.py``'s no-op
run, without the rest of the pool's noise; compare it with ``overhead_bench.py``'s per-batch
time (~190 us): 0.95x of ``progress=False``'s rows/s leaves the dashboard ~10 us a batch.
Issue 16, on the shared 2-core machine at load 5-7: before the counting from fields (the same
loop with the accumulator folding events, ``recorder.emit = acc.apply``) +18.7 us a batch for a
live view, +19.2 with ``on_event``; after +3.1 to +3.5 us, +12.5 with ``on_event`` (building the
frozen events is what it costs). The quiet-machine figure before was ~13 us.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfbatch.events import Event, RunStarted, StatsAccumulator
from dfbatch.execute import _usage
from dfbatch.execute._recorder import Answered, Recorder
from dfbatch.execute._scheduler import Batch

MODES = ("nobody", "live view", "live view + on_event")


async def one(mode: str, n: int) -> float:
    """Thread CPU seconds per batch of ``n`` batches through a recorder in ``mode``."""
    batches = [Batch(i, i % 4, np.arange(4 * i, 4 * i + 4), 40, 100, at=4 * i)
               for i in range(n)]
    acc = StatsAccumulator()
    acc.apply(RunStarted(0.0, 4 * n, n, 40 * n, (10 * n,) * 4))
    rec = Recorder(4 * n, None)
    got: list[Event] = []
    on_event: Callable[[Event], None] | None = got.append if "on_event" in mode else None
    rec.listen(None if mode == "nobody" else acc, on_event)
    verdicts = [Answered([None] * 4, None, 0.0, 0.001, _usage.Usage()) for _ in range(64)]
    clock = asyncio.get_running_loop().time
    t = time.thread_time()
    for i, b in enumerate(batches):
        rec.started(i % 4, b, 1, clock())
        rec.answered(i % 4, b, verdicts[i & 63])
        got.clear()  # a subscriber keeps nothing (the events' cost is building them)
    return (time.thread_time() - t) / n


async def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--batches", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    res: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for m in MODES:
            res[m].append(await one(m, args.batches) * 1e6)
    print(f"load average {os.getloadavg()[0]:.1f}, {args.batches:,} batches, "
          f"{args.repeats} repeats (thread CPU per batch)")
    base = min(res["nobody"])
    for m in MODES:
        best = min(res[m])
        print(f"{m:22s} best {best:6.2f} us  median {statistics.median(res[m]):6.2f} us"
              + ("" if m == "nobody" else f"  (+{best - base:.2f} us over nobody)"))


if __name__ == "__main__":
    asyncio.run(main())
