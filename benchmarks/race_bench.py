"""CPU cost of hedging's ``race`` per call, against a plain ``await`` of the same call.

Run: ``.venv/bin/python benchmarks/race_bench.py`` (~10 s). 20,000 calls of a no-op async fn
under a Semaphore of 32, CPU time (``time.process_time``) per call, best of ``--repeat``: the
plain await, ``race`` before the latency model is fitted (its timer polls), and after (one
timer per call armed at the hedge / cut decision; no hedge is due, so no extra task), and a
caller's ``Pending`` (what the pool uses: an entry per call, a race only for a late one).
``overhead_bench.py`` measures the whole pool; on a shared machine its wall times vary by
more than race's cost, which this isolates.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfbatch.execute._hedge import TailState, race
from dfbatch.execute._race import Pending, Race, first_decision


async def _noop() -> int:
    await asyncio.sleep(0)
    return 1


async def _never() -> int:
    msg = "no hedge is due for a call this fast"
    raise AssertionError(msg)


async def _per_call(one: Callable[[], Awaitable[int]], n: int) -> float:
    sem = asyncio.Semaphore(32)

    async def bounded() -> None:
        async with sem:
            await one()

    t0 = time.process_time()
    await asyncio.gather(*(bounded() for _ in range(n)))
    return (time.process_time() - t0) / n * 1e6


def _raced(fitted: bool) -> Callable[[], Awaitable[int]]:
    state = TailState()
    if fitted:
        for _ in range(40):
            state.observe(100, 1.0)

    def one() -> Awaitable[int]:
        return race(_noop, _never, lambda: state.plan(100, 0.9), queued=lambda: True,
                    may_hedge=lambda q: False)

    return one


def _pended() -> Callable[[], Awaitable[int]]:
    state = TailState()
    for _ in range(40):
        state.observe(100, 1.0)
    pendings: dict[asyncio.AbstractEventLoop, Pending] = {}

    def make(task: asyncio.Task[Any], t0: float, args: object) -> Race[int]:
        return Race(task.get_loop(), task, t0, _never, lambda: state.plan(100, 0.9),
                    lambda: True, lambda q: False)

    async def one() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        pending = pendings.get(loop)
        if pending is None:
            pending = pendings[loop] = Pending(
                loop, lambda: first_decision(state.plan(0, 0.9), lambda: True), make)
        pending.add(task, None)
        try:
            return await _noop()
        finally:
            got = pending.end(task)
            assert got is None, "no race for a call this fast"

    return one


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    cases = {"plain await": lambda: _noop, "race, model not fitted": lambda: _raced(False),
             "race, model fitted": lambda: _raced(True), "Pending, model fitted": _pended}
    best = {name: min(asyncio.run(_per_call(make(), a.calls)) for _ in range(a.repeat))
            for name, make in cases.items()}
    base = best["plain await"]
    for name, us in best.items():
        print(f"{name:<24} {us:7.1f} us/call  (+{us - base:5.1f} us)")


if __name__ == "__main__":
    main()
