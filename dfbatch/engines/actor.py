"""Inside the Ray engine's agent actors: the asyncio engine's ``FnCaller``, for shipped batches.

An ``AgentActor`` (one per agent, a Ray async actor) gets ``fn`` once, in its constructor, and
then batches from the driver: a ``BatchMeta`` and the rows as an Arrow table. Each batch runs
through a ``FnCaller`` (limits, timeout, retry with backoff and Retry-After, hedging, output
normalization) whose reports go back to the driver as messages: ``("started", attempt)``,
``("event", BatchRetried | BatchHedged)``, ``("outcome", Outcome)``, ``("health", "ok" |
"outage")`` (what the actor's breaker saw), ``("sized", ok, latency_s)`` (under
``dynamic_batching``) and finally ``("done", Answered | GaveUp)`` (an
``Answered`` carries its outputs as an Arrow table). The driver (``dfbatch.engines.ray``) turns
them back into what the asyncio engine would have recorded. This module does not import Ray.

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
['started', 'health', 'outcome', 'sized', 'done']
>>> from_wire(messages[-1][1].frame)["output"].to_list()
['A', 'B']
"""

from __future__ import annotations

import asyncio
import dataclasses
import traceback
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from dfbatch.config import BatchConfig
from dfbatch.engines.lease import LeasedRates, chunk, lease_ttl
from dfbatch.events import Event
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._caller import FnCaller
from dfbatch.execute._limits import UNSENT, Cost, Hold, Limit, Limits, Outcome
from dfbatch.execute._recorder import Answered
from dfbatch.execute._scheduler import Batch
from dfbatch.execute._stack import RunLimits


# -- what travels between driver and actors --------------------------------------------------
@dataclass(frozen=True, slots=True)
class BatchMeta:
    """A batch as an actor sees it: no row positions, its rows come as a table."""

    id: int
    planned_agent: int
    tokens: int
    nbytes: int
    call_anyway: bool


def to_wire(df: Any) -> Any:
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


class _Report:
    """The caller's reports, sent to the driver as messages of the shipped batch."""

    def started(self, a: int, batch: Batch, attempt: int, t: float) -> None:
        _SHIPPED.get().send("started", attempt)

    def event(self, batch: Batch, ev: Event) -> None:
        _SHIPPED.get().send("event", ev)


class _SizerTap:
    """Stands in for the pool's ``BatchSizer``: sends each observation to the driver's."""

    def observe(self, *, ok: bool, latency_s: float) -> None:
        _SHIPPED.get().send("sized", ok, latency_s)


def _health(said: str) -> None:
    """The actor's breaker saw an answer (``"ok"``) or a stalled call (``"outage"``): the
    driver's breaker keeps the run's stall clock (``outage_timeout``) over every actor."""
    shipped = _SHIPPED.get(None)
    if shipped is not None:
        shipped.send("health", said)


class _OutcomeTap:
    """A ``Limit`` that sends how each call ended to the driver (for its AIMD limit)."""

    def try_acquire(self, cost: Cost) -> bool:
        return True

    async def acquire(self, cost: Cost) -> None:
        return None

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        if outcome is not None and outcome is not UNSENT:
            _SHIPPED.get().send("outcome", outcome)


class AgentActor:
    """One agent on the cluster (a Ray async actor): runs the batches the driver ships.

    Global limits (in-flight, AIMD, RPM, TPM) are the driver's and the limiter's; the byte
    limit per agent is local. Learned limits would be per actor (N times too loose), so none
    are learned here: configure rpm / tpm instead.
    """

    def __init__(self, fn: Any, cfg: BatchConfig, reserved: set[str], limiter: Any,
                 client: str, n_agents: int) -> None:
        rates: Limit = Limits([])
        if limiter is not None:
            ttl = lease_ttl(cfg.rate_burst)
            extra = (chunk(cfg.rpm, cfg.rate_burst, n_agents, ttl),
                     chunk(cfg.tpm, cfg.rate_burst, n_agents, ttl))
            rates = LeasedRates(limiter.lease.remote, client, requests=bool(cfg.rpm),
                                tokens=bool(cfg.tpm), extra=extra, ttl=ttl)
        local = cfg.replace(rpm=None, tpm=None, adaptive=False, dynamic_batching=False)
        limits = RunLimits.from_config(local, 1, rates_elsewhere=True)
        limits.shared = Limits([rates, _OutcomeTap()])
        limits.calls, limits.per_request = Limits([_OutcomeTap()]), Limits([rates])
        # this actor's breaker pauses its sends while the service is down and probes; whether
        # the run makes no progress at all is the driver's to say (it hears every actor)
        limits.breaker = Breaker(observer=_health)
        if cfg.dynamic_batching:  # the driver sizes batches: it gets what the caller observes
            limits.sizer = _SizerTap()  # type: ignore[assignment]
        self.slots = limits.agent_slots[0]
        self.caller = FnCaller(fn, local, limits, _Report(), reserved=reserved,
                               workers=cfg.sync_workers or cfg.max_concurrent_batches)

    def ready(self) -> bool:
        return True

    async def run(self, meta: BatchMeta, wire: Any) -> AsyncIterator[tuple[Any, ...]]:
        """Run one batch: yields the messages of the module docstring, ("done", v) last."""
        frame = from_wire(wire)
        shipped = _Shipped(frame, asyncio.Queue())
        batch = Batch(meta.id, meta.planned_agent, np.arange(frame.height), meta.tokens,
                      meta.nbytes, meta.call_anyway)
        task = asyncio.create_task(self._attempts(shipped, batch))
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

    async def _attempts(self, shipped: _Shipped, batch: Batch) -> None:
        _SHIPPED.set(shipped)
        self.slots.force_acquire(Cost())  # the driver already counted this batch against the agent
        slot = Hold(self.slots, Cost(), held=True)
        try:
            await self.caller.open()
            verdict = await self.caller.call(0, batch, shipped.frame, slot)
            if isinstance(verdict, Answered):
                verdict = dataclasses.replace(verdict, frame=to_wire(verdict.frame))
            shipped.send("done", verdict)
        except Exception:
            shipped.send("crash", traceback.format_exc())
        finally:
            slot.release()
