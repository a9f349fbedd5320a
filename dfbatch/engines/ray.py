"""``engine="ray"``: the same plan and the same result frame, with each agent a Ray actor.

``process(df, fn, engine="ray")`` connects to Ray (a cluster the user joined with
``ray.init(address=...)``, else ``ray_address=``, else ``RAY_ADDRESS``, else a local one), plans
exactly as the asyncio engine does (agents and the in-flight cap scale with the cluster's CPUs
when not set) and runs the plan on the same ``Pool`` with another caller, ``RayCaller``:

- **Driver** (this process): the pool's scheduling, unchanged: per-agent deques, heaviest
  first, work stealing, presplitting, bisection of failed batches, the global in-flight cap
  and the adaptive (AIMD) limit (one slot per dispatched batch, fed the outcome of every
  attempt; unlike the asyncio engine, a batch sleeping off a retry keeps its slots), the
  result's ``Outcomes`` and the checkpoint hook. ``RayCaller`` ships each batch to its agent's
  actor as an Arrow table and turns the actor's messages back into the same reports, so the
  progress bar, the dashboard and ``RunStats`` work as they do locally.
- **Agent actors** (``dfbatch.engines.actor``; one Ray async actor per agent,
  ``max_concurrency=max_concurrent_batches``): ``fn`` arrives once, in the constructor (one
  ``ray.put``). Each batch runs the asyncio engine's ``FnCaller`` (timeout, retry with backoff
  and Retry-After, hedging, output normalization, per-agent byte limit) and streams back
  ``started`` / retry / outcome messages and the verdict (outputs as an Arrow table, or the
  error).
- **Limiter actor**: the run's global RPM / TPM token buckets, leased to actors in chunks
  (``dfbatch.engines.lease``), so rate limits hold across all actors without a round trip per
  call.
- **Breakers**: each actor's own breaker pauses its sends while the service is down and probes
  with one call; the actors tell the driver of every answer and every outage or rate-limit 429,
  and the driver's breaker stops the run when no actor got an answer for ``outage_timeout``
  seconds (``RunStoppedError``, as in the asyncio engine).

If an actor dies mid-run, the batches it was running are sent again to a fresh actor for the
same agent (Ray places it where there is room); a call that was in flight ends with a
``BatchRetried`` event. A batch whose actor dies ``max_attempts`` times fails like any other
(bisected to find a row that kills the worker). Rows are recorded once, by the driver, so none
is lost or duplicated; calls are at-least-once. Actors are killed when the run ends; a local
Ray started here keeps running for the next call (``ray.shutdown()`` stops it).

``fn.dfbatch_ray_options`` (a dict) adds Ray actor options, e.g. ``{"num_gpus": 1}``; by
default actors reserve no CPU and are spread over the nodes.

Under ``executor="process"`` each actor sends a plain ``fn`` on to its worker processes by
pickle, so ``fn`` must be a function of a module importable on every node (not a lambda, a
closure, or a function of your script's ``__main__``): checked before Ray starts
(``dfbatch.engines.check_ray_fn``).

Examples
--------
>>> import polars as pl, dfbatch
>>> df = pl.DataFrame({"text": ["a", "bb", "ccc"]})
>>> out = dfbatch.process(df, lambda b: b["text"].str.len_chars(), engine="ray",
...                       progress=False)  # doctest: +SKIP
>>> out["output"].to_list()  # doctest: +SKIP
[1, 2, 3]
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import polars as pl

from dfbatch.config import BatchConfig, cpu_cores
from dfbatch.engines.actor import AgentActor, BatchMeta, from_wire, to_wire
from dfbatch.engines.lease import Limiter, lease_ttl
from dfbatch.errors import ConfigError
from dfbatch.events import BatchRetried
from dfbatch.execute._caller import Reporter
from dfbatch.execute._limits import Cost, Hold
from dfbatch.execute._recorder import Answered, GaveUp, Verdict
from dfbatch.execute._retry import describe
from dfbatch.execute._scheduler import Batch
from dfbatch.execute._stack import RunLimits

_MAX_AGENTS = 65_535


@functools.cache
def _ray() -> Any:
    """Ray, imported on first use (collecting this module's doctests does not start it)."""
    import ray

    return ray


@functools.cache
def _actor_gone() -> tuple[type[BaseException], ...]:
    """The errors that mean "that actor is gone" (dead, or restarting elsewhere)."""
    from ray import exceptions

    return tuple(getattr(exceptions, n) for n in ("RayActorError", "ActorUnavailableError")
                 if hasattr(exceptions, n))


@functools.cache
def _remote_classes() -> tuple[Any, Any]:
    """The Ray actor classes (agent, limiter), declared once per process."""
    ray = _ray()
    return ray.remote(AgentActor), ray.remote(Limiter)


# -- connecting ------------------------------------------------------------------------------
def connect(address: str | None = None) -> None:
    """Use the Ray this process already joined, else ``ray.init(address)``.

    ``address=None`` lets Ray decide: ``RAY_ADDRESS``, a cluster started on this machine with
    ``ray start``, else a new local one.
    """
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address)


def configure(cfg: BatchConfig, address: str | None) -> BatchConfig:
    """Connect, then size unset ``agents`` / ``max_in_flight`` by the cluster's CPUs."""
    connect(address)
    cpus = int(_ray().cluster_resources().get("CPU", 0)) or cpu_cores()
    updates: dict[str, int] = {}
    if cfg.agents is None:
        updates["agents"] = min(_MAX_AGENTS, cfg.agents_per_core * cpus)
    if cfg.max_in_flight is None:
        updates["max_in_flight"] = 16 * cpus
    return cfg.replace(**updates) if updates else cfg


# -- the driver ------------------------------------------------------------------------------
class _Gang:
    """The run's actors: one per agent (replaced when it dies) and the rate limiter."""

    def __init__(self, fn: Any, cfg: BatchConfig, reserved: set[str], n_agents: int) -> None:
        ray = _ray()
        try:
            self.fn_ref = ray.put(fn)  # fn is serialized once; every actor gets this copy
        except Exception as exc:
            msg = f"engine='ray' ships fn to the actors, but fn cannot be pickled: {exc!r}"
            raise ConfigError(msg) from exc
        self.cfg, self.reserved, self.n = cfg, reserved, n_agents
        self.run_id = uuid.uuid4().hex[:8]
        self.options = {"num_cpus": 0, "scheduling_strategy": "SPREAD",
                        **dict(getattr(fn, "dfbatch_ray_options", None) or {})}
        self.agent_class, limiter_class = _remote_classes()
        self.limiter = None
        if cfg.rpm or cfg.tpm:
            self.limiter = limiter_class.options(
                num_cpus=0, name=f"dfbatch-{self.run_id}-limiter"
            ).remote(cfg.rpm, cfg.tpm, cfg.rate_burst, lease_ttl(cfg.rate_burst))
        self.generation = [0] * n_agents
        self.handles = [self._spawn(a) for a in range(n_agents)]

    def _spawn(self, a: int) -> Any:
        name = f"dfbatch-{self.run_id}-agent{a}-{self.generation[a]}"
        options = {**self.options, "name": name,
                   "max_concurrency": self.cfg.max_concurrent_batches}
        return self.agent_class.options(**options).remote(
            self.fn_ref, self.cfg, self.reserved, self.limiter, name, self.n
        )

    async def ready(self) -> None:
        """Wait until every actor has built its pool (surfaces an fn the workers cannot load)."""
        try:
            await asyncio.gather(*(h.ready.remote() for h in self.handles))
        except _actor_gone() as exc:
            msg = (
                "engine='ray': the agent actors could not start; fn and the modules it uses "
                "must be importable on every node (install them there, or pass "
                f"runtime_env={{'py_modules': [...]}} to ray.init). Cause: {exc}"
            )
            raise ConfigError(msg) from exc

    def agent(self, a: int) -> Any:
        return self.handles[a]

    def replace(self, a: int, dead: Any) -> None:
        """A fresh actor for agent ``a`` (once per dead actor, however many calls noticed)."""
        if self.handles[a] is dead:
            self.generation[a] += 1
            self.handles[a] = self._spawn(a)

    def close(self) -> None:
        for handle in [*self.handles, self.limiter]:
            if handle is not None:
                _ray().kill(handle)


@dataclass
class _Call:
    """The driver's view of one dispatched batch."""

    a: int
    batch: Batch
    seq: int
    attempt: int = 0
    in_call: bool = False  # a call is in flight (started, not yet retried or done)


class RayEngine:
    """``engine="ray"``: the pool's callers ship batches to Ray actors."""

    rates_elsewhere = True  # RPM / TPM live in the limiter actor, not in this process

    def caller(self, fn: Any, cfg: BatchConfig, limits: RunLimits, report: Reporter, *,
               reserved: set[str], queued: Any) -> RayCaller:
        return RayCaller(fn, cfg, limits, report, reserved=reserved)


class RayCaller:
    """A ``Caller`` whose batches run on the run's agent actors; same verdicts as ``FnCaller``."""

    def __init__(self, fn: Any, cfg: BatchConfig, limits: RunLimits, report: Reporter, *,
                 reserved: set[str]) -> None:
        self.fn, self.cfg, self.limits, self.report = fn, cfg, limits, report
        self.reserved = reserved
        self.gang: _Gang | None = None

    async def open(self) -> None:
        self.gang = _Gang(self.fn, self.cfg, self.reserved, len(self.limits.agent_slots))
        await self.gang.ready()

    def close(self) -> list[int]:
        if self.gang is not None:
            self.gang.close()
        return []

    async def call(self, a: int, batch: Batch, df: pl.DataFrame, slot: Hold) -> Verdict:
        cost = Cost(tokens=batch.tokens, nbytes=batch.nbytes)
        adaptive = self.limits.adaptive
        # global in-flight cap and AIMD: a slot per dispatch; each attempt's outcome was
        # observed already, so the slot is released without one
        async with self.limits.shared.hold(cost):
            seq = adaptive.next_seq() if adaptive else 0
            verdict = await self._dispatch(_Call(a, batch, seq), df)
        if isinstance(verdict, Answered):
            return dataclasses.replace(verdict, frame=from_wire(verdict.frame))
        return verdict

    async def _dispatch(self, call: _Call, df: pl.DataFrame) -> Verdict:
        """Ship the batch to its agent's actor; a dead actor is replaced and the batch resent."""
        assert self.gang is not None
        b = call.batch
        meta = BatchMeta(b.id, b.planned_agent, b.tokens, b.nbytes, b.call_anyway)
        wire = to_wire(df)
        deaths = 0
        while True:
            actor = self.gang.agent(call.a)
            try:
                async for ref in actor.run.remote(meta, wire):
                    verdict = self._receive(call, await ref)
                    if verdict is not None:
                        return verdict
            except _actor_gone() as exc:
                deaths += 1
                self._lost(call, exc)
                self.gang.replace(call.a, actor)
                if deaths >= self.cfg.max_attempts:
                    return GaveUp(describe(exc), True, time.time(), 0.0)
                continue
            msg = f"the actor for agent {call.a} ended batch {b.id} without a verdict"
            raise RuntimeError(msg)

    def _receive(self, call: _Call, item: tuple[Any, ...]) -> Verdict | None:
        """Turn one message from the actor into what the asyncio engine would have reported."""
        now = asyncio.get_running_loop().time()
        kind = item[0]
        if kind == "started":
            call.attempt, call.in_call = item[1], True
            self.report.started(call.a, call.batch, item[1], now)
        elif kind == "event":
            ev = dataclasses.replace(item[1], t=now, agent_id=call.a)
            if isinstance(ev, BatchRetried):
                call.in_call = False
            self.report.event(call.batch, ev)
        elif kind == "outcome":
            if item[1].rate_limited and self.limits.breaker is not None:
                self.limits.breaker.stalled("rate_limit")
            if self.limits.adaptive is not None:
                self.limits.adaptive.observe(dataclasses.replace(item[1], started_seq=call.seq))
        elif kind == "health" and self.limits.breaker is not None:
            if item[1] == "ok":
                self.limits.breaker.answered()
            else:
                self.limits.breaker.stalled(item[1])
        elif kind == "sized" and self.limits.sizer is not None:
            self.limits.sizer.observe(ok=item[1], latency_s=item[2])
        elif kind == "done":
            verdict: Verdict = item[1]
            return verdict
        return None

    def _lost(self, call: _Call, exc: BaseException) -> None:
        """The actor died: close the call it had in flight, so every start has an end."""
        if call.in_call:
            t = asyncio.get_running_loop().time()
            b = call.batch
            self.report.event(b, BatchRetried(t, b.id, call.a, b.tokens, call.attempt, 0.0,
                                              describe(exc)))
            call.in_call = False
