"""The agent loop: wires the scheduler, a caller and the recorder, and owns every task.

Each agent starts a worker task per free concurrency slot; a worker asks the ``Scheduler`` for
the agent's next batch and runs it: the ``Caller`` turns the batch into a verdict, the
``Recorder`` records it (or the scheduler bisects a failed multi-row batch). Then the worker
keeps its slot for the next batch (no task and no hop through the agent per batch), unless a
batch back from its backoff (or another chunk's pool, sharing the limits) waits for the slot:
then it hands the slot over and ends. The agent sleeps meanwhile; a slot given back for a
backoff, batches queued again or its last worker gone wake it. The limits come in as a
``RunLimits`` built once per run (and closed by the run as it ends; a pool given none builds
and closes its own). Cancelling ``run()`` (Ctrl-C) or ``stop()`` (the Stop
button) cancels every call in flight and marks unfinished rows ``"cancelled"``. A call that
fails for good (a refused key, no quota: ``fatal_run``) stops the run too, but drains it: the
breaker is stopped, so no request goes out and every batch waiting to send gives up at once,
while the calls already sent may still bring their answers (paid for) back, for up to
``DRAIN_S`` seconds; then the rest are cancelled.

**Contiguous batches.** The pool reorders the frame it is given once, by batch (one gather for
the whole frame), so each batch is a zero-copy ``frame.slice`` and its outcomes are stamped
through basic slices; bisected and resized batches stay contiguous ranges. ``order`` maps the
run's positions back to the frame's (``None``: the frame was in batch order already), and
``run`` / ``out`` return the outcomes in the frame's order. The pool knows nothing else about
Polars.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import FnInterrupt, NoProgressError, StillRunningWarning
from dfbatch.events import Event
from dfbatch.execute._caller import LOCAL, CallerFactory
from dfbatch.execute._charge import one_request_per_call
from dfbatch.execute._limits import CapacityLimit, Cost, Hold
from dfbatch.execute._recorder import Answered, Outcomes, Recorder, Verdict
from dfbatch.execute._retry import fatal_message
from dfbatch.execute._scheduler import Batch, Batches, Scheduler
from dfbatch.execute._stack import RunLimits

__all__ = ["Batch", "Outcomes", "Pool"]  # Batch, Outcomes: for persist._checkpoint

_ONE = Cost()
# after a call failed for good, how long the calls already sent may take to bring their
# answers back (paid for; a refused key's come back at once) before they are cancelled
DRAIN_S = 30.0


class Pool:
    """Runs ``fn`` over ``batches`` (one list per agent). Use once: ``await pool.run()``."""

    def __init__(
        self,
        fn: Callable[[pl.DataFrame], Any],
        frame: pl.DataFrame,
        batches: Batches | list[list[Batch]],
        cfg: BatchConfig,
        *,
        row_tokens: np.ndarray,
        row_bytes: np.ndarray | None = None,
        emit: Callable[[Event], None] | None,
        reserved: set[str],
        on_batch_done: Callable[[Batch, Outcomes], None] | None = None,
        limits: RunLimits | None = None,
        engine: CallerFactory = LOCAL,
    ) -> None:
        self.order, frame, batches = contiguous(frame, batches)
        if self.order is not None:
            row_tokens = row_tokens[self.order]
            row_bytes = row_bytes[self.order] if row_bytes is not None else None
        self.frame = frame
        self.token_limit = cfg.token_limit
        self.owns_limits = limits is None  # (then it closes them as it ends)
        if limits is None:
            limits = RunLimits.from_config(cfg, batches.n_agents,
                                           rates_elsewhere=engine.rates_elsewhere)
        self.limits = limits
        # bigger batches only where they mean fewer requests (not a per-row adapter)
        sizer = limits.sizer if one_request_per_call(fn) else None
        self.sched = Scheduler(batches, cfg, row_tokens=row_tokens, row_bytes=row_bytes,
                               sizer=sizer, rate_bound=limits.rate_bound,
                               on_change=self._notify)
        self.recorder = Recorder(frame.height, emit, on_batch_done)
        self.caller = engine.caller(fn, cfg, limits, self.recorder, reserved=reserved,
                                    queued=self.sched.queued)
        self.tasks: dict[asyncio.Task[None], Hold] = {}  # each batch's task and its slot
        self.stopping = False
        self.crash: BaseException | None = None
        self.fatal: str | None = None  # why the run stopped at once (RunStoppedError's message)
        self._first_cause = False  # ``fatal`` is that of the error that stopped the run
        self._wake: asyncio.Event | None = None
        self._live = [0] * self.sched.n_agents  # workers per agent
        self._finished: asyncio.Event | None = None
        self._drain: asyncio.TimerHandle | None = None

    @property
    def out(self) -> Outcomes:
        """The outcomes so far, in the order of the frame the pool was given."""
        out = self.recorder.out
        return out if self.order is None else out.reordered(self.order)

    async def run(self) -> Outcomes:
        """Run to completion, or until ``stop()``: then unfinished rows are ``"cancelled"``.

        Cancelling the task running this cancels every call in flight and re-raises.
        """
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()
        agents: list[asyncio.Task[None]] = []
        # no answer for outage_timeout: stop now, not when each call in flight or asleep (a
        # long Retry-After) next looks at the breaker
        breaker = self.limits.breaker
        unlisten = breaker.listen(self._stopped_by) if breaker is not None else None
        self.limits.pools.append(self._notify)  # (see _gave_up)
        try:
            if self.sched.pending and not self.stopping:
                await self.caller.open()
                if not self.stopping:  # (stop() may come while the caller opens)
                    agents = [asyncio.create_task(self._agent(a))
                              for a in range(self.sched.n_agents)]
                    await self._finished.wait()
        finally:
            if unlisten is not None:
                unlisten()
            if self._drain is not None:
                self._drain.cancel()
            self.limits.pools.remove(self._notify)
            self.stopping = True
            live = [*agents, *self.tasks]
            for task in live:
                task.cancel()
            await asyncio.gather(*live, return_exceptions=True)
            running = self.caller.close()
            if self.owns_limits:
                self.limits.close()
            self.sched.release()  # (its batches built ahead: a traceback may keep the pool)
        if self.crash is not None:
            raise self.crash.args[0] if isinstance(self.crash, FnInterrupt) else self.crash
        if running:
            msg = (f"the fn calls of batches {running} (run_batch_id) timed out or were "
                   "stopped but still run in worker threads (a thread cannot be stopped); "
                   "their rows carry an error")
            warnings.warn(msg, StillRunningWarning, stacklevel=2)
        if self.fatal is None and breaker is not None and breaker.stopped is not None \
                and self.recorder.unfinished:  # (drained by a stop no verdict here gave:
            self.fatal = fatal_message(breaker.stopped)  # fn kept its error to itself)
        self.recorder.mark_unfinished()
        return self.out

    def stop(self) -> None:
        """Stop gracefully: start nothing new, cancel calls in flight, return what is done."""
        self.stopping = True
        if self._finished is not None:
            self._finished.set()

    def drain(self) -> None:
        """Stop without losing paid answers: start nothing new and stop once the calls in
        flight are back (with the breaker stopped none sends again), or ``DRAIN_S`` from
        now, whichever comes first. For a run stopped by a call that failed for good (here,
        or in another pool on the same limits: another chunk's)."""
        self._drain_then_stop(recorded=False)

    def _drain_then_stop(self, *, recorded: bool = True) -> None:
        """A call failed for good: start nothing new and stop once the calls in flight are
        back (their answers are paid for; with the breaker stopped none sends again), or
        ``DRAIN_S`` from now, whichever comes first. ``recorded``: called as the current
        task recorded its verdict (it is done); not from inside fn (the breaker's stop)."""
        if self.stopping:
            return
        self.stopping = True
        if self._finished is not None and self._drain is None:
            self._drain = asyncio.get_running_loop().call_later(DRAIN_S, self.stop)
        self._drained(recorded=recorded)

    def _drained(self, *, recorded: bool = False) -> None:
        """Stopping, and no batch is in flight any more (the caller's task may be the last,
        when ``recorded``: it is done when its verdict is recorded): finish."""
        current = asyncio.current_task() if recorded else None
        if self._finished is not None and all(
                task.done() or task is current for task in self.tasks):
            self._finished.set()

    def _stopped_by(self, exc: BaseException) -> None:
        """The breaker stopped the run: the rows not done stay unfinished (resumable). A stall
        stops it from here; a call that failed for good (a refused key) drains it (its calls
        in flight were sent: their answers are paid for; this pool's, or another chunk's
        sharing the limits, whose own calls may all be in flight) and gives the run's error
        with its verdict, whose error fn may have cleaned (a redacted key)."""
        if isinstance(exc, NoProgressError):
            if self.fatal is None:
                self.fatal = fatal_message(exc)
            self.stop()
        else:  # (from inside fn, maybe: its task is not done, its verdict is to come)
            self._drain_then_stop(recorded=False)

    @property
    def cancelled_rows(self) -> int:
        return self.recorder.unfinished

    async def _agent(self, a: int) -> None:
        """Start a worker for each free slot of agent ``a`` that has a batch to run. While its
        workers run, it sleeps until woken (batches queued again, a slot given back for a
        backoff, its last worker gone, all done); with no worker left it queues for a slot
        (held elsewhere: by a batch back from its backoff, or the pool of another chunk)."""
        limit, sched = self.limits.agent_slots[a], self.sched
        wake = self._wake
        assert wake is not None
        while not self.stopping:
            # (a batch back from its backoff waits for a slot first: try_acquire says no)
            got = limit.try_acquire(_ONE)
            if not got and not self._live[a] and sched.pending:
                await limit.acquire(_ONE)
                got = True
            while got:
                batch = sched.take(a)
                if batch is None:
                    limit.release(_ONE)  # never hold a slot while idle
                    break
                slot = _Slot(limit, self._notify)
                task = asyncio.create_task(self._work(a, batch, slot))
                self._live[a] += 1
                self.tasks[task] = slot
                task.add_done_callback(self._task_done)
                got = limit.try_acquire(_ONE)
            if not sched.pending:
                return
            wake.clear()
            await wake.wait()

    async def _work(self, a: int, batch: Batch, slot: _Slot) -> None:
        """Run ``batch``, then the agent's next ones while this worker keeps its slot (no task
        and no hop through the agent per batch)."""
        sched, recorder = self.sched, self.recorder
        try:
            while True:
                try:
                    if (batch.tokens > self.token_limit and not batch.call_anyway) or \
                            batch.reject:
                        error = sched.oversize(a, batch)
                    else:
                        error = None
                    if error is None:
                        verdict = await self.caller.call(a, batch, self._slice(batch), slot)
                        self._record(a, batch, verdict)
                    elif error:
                        recorder.failed(a, batch, error, time.time(), 0.0)
                finally:
                    if batch.tries:  # (stopped, cancelled, bisected: its attempts count)
                        recorder.settle(batch)
                    if sched.finished() and self._finished is not None:
                        self._finished.set()
                # hand the slot on: to a batch back from its backoff (or another chunk's
                # pool) if one waits for it, else keep it for the agent's next batch
                if self.stopping or not slot.pass_on():
                    return
                nxt = sched.take(a)
                if nxt is None:
                    slot.drop()
                    self._gave_up()
                    return
                batch = nxt
        finally:
            self._live[a] -= 1
            if not self._live[a]:
                self._notify()

    def _record(self, a: int, batch: Batch, verdict: Verdict) -> None:
        if isinstance(verdict, Answered):
            self.recorder.answered(a, batch, verdict)
        elif verdict.fatal:  # the rows stay unfinished (resumable); the run stops
            if verdict.kept is not None:  # ... but those answered before keep their answers
                where, answered = verdict.kept
                part = self.sched._new_batch(batch, batch.rows[where])
                self.recorder.answered(a, part, answered)
            # the first cause: the error that stopped the run, not one of another kind (a
            # 403 after the 401) from a call sent before it that happened to be back first
            if self.fatal is None or (verdict.first and not self._first_cause):
                self.fatal, self._first_cause = verdict.error, verdict.first
            self._drain_then_stop()
        elif verdict.bisect and len(batch.rows) > 1:
            self.recorder.bisected(a, batch, verdict.error, verdict.elapsed)
            self.sched.requeue(a, self.sched.halves(batch))
        else:
            self.recorder.failed(a, batch, verdict.error, verdict.wall0, verdict.elapsed)

    def _slice(self, batch: Batch) -> pl.DataFrame:
        """The rows fn gets for ``batch``: a zero-copy slice where they are contiguous."""
        if batch.at >= 0:
            return self.frame.slice(batch.at, len(batch.rows))
        return self.frame[batch.rows]

    def _gave_up(self) -> None:
        """A worker gave its slot up, nothing left to run here: wake the other pools on these
        limits (another chunk's), whose agents would not look for a free slot otherwise."""
        for wake in self.limits.pools:
            if wake != self._notify:
                wake()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task).release()  # (a task cancelled before it started ran no finally)
        if self.stopping:
            self._drained()
        if not task.cancelled() and task.exception() is not None and self.crash is None:
            self.crash = task.exception()  # a bug in dfbatch itself: surface it, do not hang
            self.stop()


class _Slot(Hold):
    """One of an agent's concurrency slots, held by a worker. Given back for a backoff (the
    caller's ``release``) it wakes the agents, so another batch may use it meanwhile."""

    __slots__ = ("wake",)

    def __init__(self, limit: CapacityLimit, wake: Callable[[], None]) -> None:
        super().__init__(limit, _ONE, held=True)
        self.wake = wake

    def release(self) -> None:
        if self.held:
            self.drop()
            self.wake()

    def drop(self) -> None:
        """Give the slot back without waking anyone (the worker ends: nothing to run)."""
        Hold.release(self)

    def pass_on(self) -> bool:
        """Give the slot back and take it again at once, unless a batch back from its backoff
        waits for it (it gets it: False)."""
        if not self.held:
            return False
        Hold.release(self)
        if self.limit.try_acquire(_ONE):
            self.held = True
            return True
        return False


def contiguous(
    frame: pl.DataFrame, batches: Batches | list[list[Batch]]
) -> tuple[np.ndarray | None, pl.DataFrame, Batches]:
    """``frame`` reordered so each batch's rows are one contiguous range (one gather), the
    batches renumbered to those ranges, and the order (run position -> frame position; None
    when the frame needs no reordering). Rows in no batch go last."""
    table = Batches.of(batches)
    if not len(table):
        return None, frame, table
    order = table.row_order()
    if len(order) < frame.height:
        order = np.concatenate([order, np.setdiff1d(np.arange(frame.height), order)])
    identity = len(order) == frame.height and bool((order == np.arange(len(order))).all())
    if identity:
        return None, frame, table.contiguous()
    return order, frame[order], table.contiguous()
