"""Inside the Ray engine's agent actors: the asyncio pool's per-batch code, for shipped batches.

An ``AgentActor`` (one per agent, a Ray async actor) gets ``fn`` once, in its constructor, and
then batches from the driver: a ``BatchMeta`` and the rows as an Arrow table. Each batch runs
the asyncio pool's own ``Pool._attempts`` (limits, timeout, retry with backoff and
Retry-After, hedging, output normalization) in an ``_AgentPool``, a ``Pool`` with no queues
whose recording methods send messages back instead: ``("started", attempt)``,
``("event", BatchRetried | BatchHedged)``, ``("outcome", Outcome)``,
``("sized", ok, latency_s)`` (under ``dynamic_batching``) and finally
``("done", Answered | GaveUp)``. The driver (``dfbatch.engines.ray``) turns them back into
what the asyncio pool would have done. This module does not import Ray.

Examples
--------
>>> import asyncio, polars as pl
>>> from dfbatch import BatchConfig
>>> cfg = BatchConfig(dynamic_batching=True)
>>> actor = AgentActor(lambda b: b["text"].str.to_uppercase(), cfg, set(), None, "agent0", 1)
>>> async def one():
...     meta = BatchMeta(id=7, planned_agent=0, tokens=2, nbytes=10, call_anyway=False)
...     return [m async for m in actor.run(meta, to_wire(pl.DataFrame({"text": ["a", "b"]})))]
>>> messages = asyncio.run(one())
>>> [m[0] for m in messages]
['started', 'outcome', 'sized', 'done']
>>> from_wire(messages[-1][1].table)["output"].to_list()
['A', 'B']
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from dfbatch.config import BatchConfig
from dfbatch.engines.lease import LeasedRates, chunk, lease_ttl
from dfbatch.errors import OutputError
from dfbatch.events import Event
from dfbatch.execute import _usage
from dfbatch.execute._limits import Cost, Limit, Limits, Outcome
from dfbatch.execute._pool import Batch, Outcomes, Pool
from dfbatch.execute._retry import describe


# -- what travels between driver and actors --------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchMeta:
    """A batch as an actor sees it: no row positions, its rows come as a table."""

    id: int
    planned_agent: int
    tokens: int
    nbytes: int
    call_anyway: bool


@dataclass(frozen=True, slots=True)
class Answered:
    """fn answered: one output per row (``table``), some rows may carry their own error."""

    table: Any  # pa.Table, or a pl.DataFrame that Arrow cannot hold
    row_errors: list[str | None] | None
    wall0: float
    elapsed: float
    used: _usage.Usage


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Every attempt failed; ``bisect``: splitting the batch may isolate the bad row."""

    error: str
    bisect: bool
    wall0: float
    elapsed: float


Verdict = Answered | GaveUp


def to_wire(df: pl.DataFrame) -> Any:
    """A frame as an Arrow table (zero-copy in Ray's object store), or as is if it cannot be."""
    try:
        return df.to_arrow()
    except Exception:  # e.g. Object columns: let Ray pickle the frame
        return df


def from_wire(x: Any) -> pl.DataFrame:
    if isinstance(x, pa.Table):
        frame = pl.from_arrow(x)
        assert isinstance(frame, pl.DataFrame)
        return frame
    return x  # type: ignore[no-any-return]


# -- inside an agent actor -------------------------------------------------------------------
@dataclass
class _Shipped:
    """One batch inside an actor: its rows and the messages going back to the driver."""

    frame: pl.DataFrame
    queue: asyncio.Queue[tuple[Any, ...]]

    def send(self, *item: Any) -> None:
        self.queue.put_nowait(item)


_SHIPPED: ContextVar[_Shipped] = ContextVar("dfbatch_ray_batch")


class _AgentPool(Pool):
    """The asyncio pool's per-batch code, run inside an actor for batches the driver ships.

    No queue runs here (the driver schedules). ``_attempts`` runs as in the asyncio pool; what
    that pool would record or emit goes back to the driver instead. Global limits (in-flight,
    AIMD, RPM, TPM) are the driver's and the limiter's; the byte limit per agent is local.
    """

    def __init__(self, fn: Any, cfg: BatchConfig, reserved: set[str], rates: Limit) -> None:
        local = cfg.replace(rpm=None, tpm=None, adaptive=False, dynamic_batching=False)
        super().__init__(fn, pl.DataFrame(), [[]], local, row_tokens=np.zeros(0, np.int64),
                         emit=self._forward, reserved=reserved)
        self.shared = Limits([rates, _OutcomeTap()])
        if cfg.dynamic_batching:  # the driver sizes batches: it gets what the pool observes
            self.sizer = _SizerTap()  # type: ignore[assignment]
        if not self.is_async:
            workers = cfg.sync_workers or cfg.max_concurrent_batches
            self.executor = ThreadPoolExecutor(workers, thread_name_prefix="dfbatch")

    async def attempts(self, shipped: _Shipped, batch: Batch) -> None:
        _SHIPPED.set(shipped)
        if len(batch.rows) > self.out.n:  # hedging counts attempts in self.out; never read here
            self.out = Outcomes(len(batch.rows))
        slots = self.agent_slots[0]
        slots.force_acquire(Cost())  # the driver already counted this batch against the agent
        try:
            await self._attempts(0, batch)
        except Exception:
            shipped.send("crash", traceback.format_exc())
        finally:
            slots.release(Cost())

    def _slice(self, batch: Batch) -> pl.DataFrame:
        return _SHIPPED.get().frame

    def _started(self, a: int, batch: Batch, attempt: int, t: float) -> None:
        _SHIPPED.get().send("started", attempt)

    def _forward(self, ev: Event) -> None:
        _SHIPPED.get().send("event", ev)

    def _learn_limits(self, headers: dict[str, str]) -> None:
        """Learned limits would be per actor (N times too loose): configure rpm / tpm instead."""

    def _record_ok(self, a: int, batch: Batch, frame: pl.DataFrame,
                   row_errors: list[str | None] | None, wall0: float, elapsed: float,
                   used: _usage.Usage) -> None:
        _SHIPPED.get().send("done", Answered(to_wire(frame), row_errors, wall0, elapsed, used))

    def _failed(self, a: int, batch: Batch, exc: Exception, wall0: float, elapsed: float) -> None:
        verdict = GaveUp(describe(exc), not isinstance(exc, OutputError), wall0, elapsed)
        _SHIPPED.get().send("done", verdict)


class _SizerTap:
    """Stands in for the pool's ``BatchSizer``: sends each observation to the driver's."""

    def observe(self, *, ok: bool, latency_s: float) -> None:
        _SHIPPED.get().send("sized", ok, latency_s)


class _OutcomeTap:
    """A ``Limit`` that sends how each call ended to the driver (for its AIMD limit)."""

    async def acquire(self, cost: Cost) -> None:
        return None

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        if outcome is not None:
            _SHIPPED.get().send("outcome", outcome)


class AgentActor:
    """One agent on the cluster (a Ray async actor): runs the batches the driver ships."""

    def __init__(self, fn: Any, cfg: BatchConfig, reserved: set[str], limiter: Any,
                 client: str, n_agents: int) -> None:
        rates: Limit = Limits([])
        if limiter is not None:
            ttl = lease_ttl(cfg.rate_burst)
            extra = (chunk(cfg.rpm, cfg.rate_burst, n_agents, ttl),
                     chunk(cfg.tpm, cfg.rate_burst, n_agents, ttl))
            rates = LeasedRates(limiter.lease.remote, client, requests=bool(cfg.rpm),
                                tokens=bool(cfg.tpm), extra=extra, ttl=ttl)
        self.pool = _AgentPool(fn, cfg, reserved, rates)

    def ready(self) -> bool:
        return True

    async def run(self, meta: BatchMeta, wire: Any) -> AsyncIterator[tuple[Any, ...]]:
        """Run one batch: yields the messages of the module docstring, ("done", v) last."""
        frame = from_wire(wire)
        shipped = _Shipped(frame, asyncio.Queue())
        batch = Batch(meta.id, meta.planned_agent, np.arange(frame.height), meta.tokens,
                      meta.nbytes, meta.call_anyway)
        task = asyncio.create_task(self.pool.attempts(shipped, batch))
        try:
            while True:
                item = await shipped.queue.get()
                if item[0] == "crash":
                    msg = f"dfbatch failed inside a Ray actor:\n{item[1]}"
                    raise RuntimeError(msg)
                yield item
                if item[0] == "done":
                    return
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
