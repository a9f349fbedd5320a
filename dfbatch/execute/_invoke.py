"""How one try calls ``fn``: usage, the run's binding, the timeout, the executor and, with
``hedge_after``, the race against a duplicate -- as few coroutines per call as it can (at
thousands of cheap calls a second, a layer of them costs more than a no-op fn).

``Invoker`` is what ``_caller.FnCaller`` calls fn with; the caller holds the run's limits around
each try (and around a hedge: ``_race``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import FnInterrupt
from dfbatch.execute import _usage
from dfbatch.execute._attempt import call_paced, is_async
from dfbatch.execute._charge import (
    Binding,
    charges_per_request,
    enter,
    leave,
    one_request_per_call,
)
from dfbatch.execute._executors import InThreads, timed
from dfbatch.execute._hedge import has_room
from dfbatch.execute._limits import Cost, Limits
from dfbatch.execute._race import Pending, Race, first_decision
from dfbatch.execute._stack import RunLimits
from dfbatch.execute._watch import Watch

if TYPE_CHECKING:
    from dfbatch.execute._scheduler import Batch

_NOTHING = Limits([])


class Invoker:
    """Calls ``fn`` once per try (``_call``; ``_call_hedged`` under ``hedge_after``)."""

    def __init__(self, fn: Callable[[pl.DataFrame], Any], cfg: BatchConfig, limits: RunLimits,
                 *, queued: Callable[[], bool] = lambda: False,
                 workers: int | None = None) -> None:
        self.fn, self.cfg, self.limits, self.queued = fn, cfg, limits, queued
        self.is_async = is_async(fn)
        # an fn that charges each HTTP request itself (dfbatch.limits.request) is charged the
        # in-flight and adaptive limits per call, and the rates, pause and breaker per request
        self.per_request = charges_per_request(fn)
        # ... except from worker processes (executor="process"): request() there is outside
        # the run and charges nothing, so the run charges each call for it, as one request
        # per row for an fn that sends one per row (else its rpm / tpm would not hold at all)
        self.requests_per_row = False
        if self.per_request and not self.is_async and cfg.executor == "process":
            self.per_request = False
            self.requests_per_row = not one_request_per_call(fn)
        self.stack = limits.calls if self.per_request else limits.shared
        # what dfbatch.limits.request charges inside fn: nothing more for a plain fn (its
        # call was charged), every request for one that charges per request
        self.binding = (Binding(limits.per_request, limits.breaker) if self.per_request
                        else Binding(_NOTHING))
        workers = workers or cfg.sync_workers or (
            min(64, cfg.in_flight_cap) if cfg.executor == "thread" else (os.cpu_count() or 1))
        self.threads = InThreads(workers, cfg.executor)
        self.watch = Watch(cfg.timeout) if cfg.timeout is not None else None
        # an fn charging per request waits for the run's limits inside its call: its duration
        # says nothing of a straggler, and a copy would resend every request
        self.hedging = bool(cfg.hedge_after) and not self.per_request
        self._q = float(cfg.hedge_after or 0.0)
        self._paced = self.per_request and self.is_async and cfg.timeout is not None
        self._pending: Pending | None = None  # this loop's calls in flight (with hedging)
        self.late = _usage.LateReports()  # usage reported after its call returned: told once

    def close(self) -> list[int]:
        """The run (this caller's pool) is over: cancel the timers armed on the loop (the
        shared call timeout, the hedging decisions) and close the executor; the ids of
        batches whose calls may still run (threads cannot be stopped)."""
        if self.watch is not None:
            self.watch.close()
        if self._pending is not None:
            self._pending.close()
        return self.threads.close()

    async def _call_hedged(self, a: int, batch: Batch, df: pl.DataFrame, cost: Cost,
                           task: asyncio.Task[Any]) -> tuple[Any, _usage.Usage]:
        """Call fn under ``hedge_after``: a straggler for its size gets a duplicate (the first
        answer wins) or is cut by the adaptive timeout (``dfbatch.execute._hedge``). The call
        costs an entry in ``Pending`` until it is late enough for a decision (``_race``)."""
        tail = self.limits.tail
        tail.attempts += 1
        pending = self._pending
        if pending is None or pending.loop is not task.get_loop():
            pending = self._pending = Pending(task.get_loop(), self._floor, self._race)
        tail.running += 1
        pending.add(task, (a, batch, df, cost))
        race_: Race[tuple[Any, _usage.Usage]] | None = None
        try:
            try:
                result = await self._call(batch, df, task)
            except BaseException as exc:
                race_ = pending.end(task)
                if race_ is None:
                    raise
                if race_.after_error(exc):  # (raises exc where it stands)
                    return await race_.wait_copy()
                return race_.outcome()
            race_ = pending.end(task)
            return result if race_ is None else race_.answered(result)
        finally:
            tail.running -= 1
            if race_ is not None:
                copy = race_.close()
                if copy is not None:
                    await asyncio.gather(copy, return_exceptions=True)

    def _floor(self) -> float:
        """The earliest age at which a call of any size may be hedged, cut or resent now (a
        plan's ages grow with the call's size: that of 0 tokens comes first)."""
        p = self.limits.tail.plan(0.0, self._q, self.cfg.hedge_budget)
        return first_decision(p, self._waiting)

    def _waiting(self) -> bool:
        """Work queued, or taken and waiting for an in-flight slot."""
        return self.queued() or not has_room(self.limits.calls.limits)

    def _race(self, task: asyncio.Task[Any], t0: float, args: tuple[int, Batch, pl.DataFrame,
              Cost]) -> Race[tuple[Any, _usage.Usage]]:
        """The race of a call late enough for a decision (built only then, by the caller: it
        holds the run's limits around a hedge)."""
        raise NotImplementedError

    async def _call(self, batch: Batch, df: pl.DataFrame,
                    task: asyncio.Task[Any]) -> tuple[Any, _usage.Usage]:
        """One call of fn in ``task``: its usage collected, the run's binding around it, the
        configured timeout (one ``Watch`` for every call) -- in one coroutine, not one each."""
        used, token = _usage.begin(self.late)
        try:
            if self._paced:
                assert self.cfg.timeout is not None
                value = await call_paced(self.fn, df, self.cfg.timeout, self.binding)
            else:
                bound = enter(self.binding)
                try:
                    if not self.is_async:
                        value = await self.threads.call(self.fn, df, self.cfg.timeout, batch.id)
                    elif (watch := self.watch) is None:
                        try:
                            value = await self.fn(df)
                        except (KeyboardInterrupt, SystemExit) as exc:  # (the run attaches
                            raise FnInterrupt(exc) from exc  # exc.partial)
                    else:
                        watch.start(task)
                        try:
                            value = await self.fn(df)
                        except asyncio.CancelledError:
                            if watch.timed_out(task):
                                raise TimeoutError from None
                            raise
                        except (KeyboardInterrupt, SystemExit) as exc:
                            raise FnInterrupt(exc) from exc
                        finally:
                            watch.stop(task)
                    # a plain function that returned a coroutine (a list never is one)
                    if type(value) is not list and inspect.isawaitable(value):
                        value = await timed(value, self.cfg.timeout)
                finally:
                    leave(bound)
        finally:
            _usage.end(token, used)
        return value, used
