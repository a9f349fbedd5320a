"""One batch in, one verdict out: limits, timeout, retries with backoff, hedging, fn's outputs.

``FnCaller`` calls ``fn`` in this process: each attempt holds the agent's bytes and the run's
shared limits (``async with``: released once on every path, with the attempt's outcome), runs
with the configured timeout (a plain fn in a daemon worker thread), retries what ``classify``
calls transient after a jittered backoff during which the agent's slot is given back, and may
send a straggler for its size a duplicate or cut it (``hedge_after``, see ``_hedge``). It
returns ``Answered`` or ``GaveUp``; the pool records it. Anything that calls batches elsewhere
(the Ray engine) is another ``Caller``, made by another ``CallerFactory`` (an engine).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import ConfigError, OutputError, RetryableError
from dfbatch.events import BatchHedged, BatchRetried, Event
from dfbatch.execute import _usage
from dfbatch.execute._attempt import (
    Grant,
    Pass,
    WorkerDiedError,
    check_importable,
    size_related,
)
from dfbatch.execute._headers import parse_headers
from dfbatch.execute._invoke import Invoker
from dfbatch.execute._limits import Cost, Hold, Outcome
from dfbatch.execute._outputs import Output, normalize, partial_of
from dfbatch.execute._race import Race
from dfbatch.execute._recorder import Answered, GaveUp, Verdict
from dfbatch.execute._retry import (
    AttemptBudget,
    Decision,
    backoff,
    classify,
    describe,
    fatal_message,
)
from dfbatch.execute._scheduler import Batch
from dfbatch.execute._stack import RunLimits


class Reporter(Protocol):
    """Where a caller says what it does while it works (the pool's ``Recorder``)."""

    def started(self, a: int, batch: Batch, attempt: int, t: float) -> None: ...

    def event(self, batch: Batch, ev: Event) -> None: ...


class Caller(Protocol):
    """Turns one batch into one verdict. ``slot`` is the agent's concurrency slot it holds."""

    async def open(self) -> None: ...

    async def call(self, a: int, batch: Batch, df: pl.DataFrame, slot: Hold) -> Verdict: ...

    def close(self) -> list[int]:
        """Release resources; the ids of batches whose calls may still run (stuck threads)."""
        ...


class CallerFactory(Protocol):
    """Makes the callers of a run; ``rates_elsewhere``: RPM / TPM are not enforced here."""

    rates_elsewhere: bool

    def caller(self, fn: Callable[[pl.DataFrame], Any], cfg: BatchConfig, limits: RunLimits,
               report: Reporter, *, reserved: set[str], queued: Callable[[], bool]) -> Caller: ...


class Local:
    """``engine="asyncio"``: fn runs in this process."""

    rates_elsewhere = False

    def caller(self, fn: Callable[[pl.DataFrame], Any], cfg: BatchConfig, limits: RunLimits,
               report: Reporter, *, reserved: set[str], queued: Callable[[], bool]) -> Caller:
        return FnCaller(fn, cfg, limits, report, reserved=reserved, queued=queued)


LOCAL = Local()


class FnCancelledError(RetryableError):
    """fn raised ``asyncio.CancelledError`` though nobody cancelled the run: a transient error."""


# an attempt: (error, its decision) or (None, None, outputs, row errors, usage)
_Tried = tuple[Exception | None, Decision | None, Output | None,
               list[str | None] | None, _usage.Usage | None]


class FnCaller(Invoker):
    """Calls ``fn`` in this process; see the module docstring."""

    def __init__(self, fn: Callable[[pl.DataFrame], Any], cfg: BatchConfig, limits: RunLimits,
                 report: Reporter, *, reserved: set[str],
                 queued: Callable[[], bool] = lambda: False, workers: int | None = None) -> None:
        super().__init__(fn, cfg, limits, queued=queued, workers=workers)
        self.report, self.reserved = report, reserved
        self.rng = random.Random(cfg.seed)

    async def open(self) -> None:
        if not self.is_async:
            if self.cfg.executor == "process":
                _check_pickles(self.fn)
            self.threads.open()
            await self.threads.ready()

    async def call(self, a: int, batch: Batch, df: pl.DataFrame, slot: Hold) -> Verdict:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        limits, cfg = self.limits, self.cfg
        cost = Cost(tokens=batch.tokens, nbytes=batch.nbytes,
                    requests=len(batch.rows) if self.requests_per_row else 1)
        wall0, t_first = time.time(), loop.time()
        budget: AttemptBudget | None = None  # (made at the first failure)
        last: Exception | None = None  # the error of the last failed try (its answers, if any)
        first_sent = 0.0  # when this batch was first sent
        attempt = 0
        while True:
            attempt += 1
            try:
                # agent bytes, shared limits, breaker pass: at once, without a coroutine, when
                # nothing must wait (see Grant)
                held = Grant(self.stack, cost, limits.agent_bytes[a],
                             None if self.per_request else limits.breaker)
                if not held.try_enter():
                    await held.enter()
                try:
                    if attempt == 1:
                        wall0, t_first = time.time(), loop.time()
                    t_call = loop.time()
                    self.report.started(a, batch, attempt, t_call)
                    if attempt == 1:
                        first_sent = t_call
                    # one try of fn (inline: a coroutine per layer costs more than a no-op fn)
                    seq = limits.adaptive.next_seq() if limits.adaptive else 0
                    try:
                        if self.hedging:
                            value, used = await self._call_hedged(a, batch, df, cost, task)
                        else:
                            value, used = await self._call(batch, df, task)
                    except asyncio.CancelledError as exc:
                        if task.cancelling():
                            raise  # the run is stopping, or a timeout fired
                        try:
                            msg = "fn raised asyncio.CancelledError (nobody cancelled the run)"
                            raise FnCancelledError(msg) from exc
                        except FnCancelledError as err:
                            tried = self._failed(err, batch, t_call, held, held.ticket, seq,
                                                 first_sent)
                    except Exception as exc:
                        tried = self._failed(exc, batch, t_call, held, held.ticket, seq,
                                             first_sent)
                    else:
                        tried = self._answered(value, used, batch, t_call, held, held.ticket,
                                               seq, first_sent)
                finally:
                    held.release()
            except BaseException as exc:
                if limits.breaker is None or not limits.breaker.is_stop(exc):
                    raise
                # another call found the run cannot succeed (a refused key): do not send
                return self._stopped(exc, last, batch, wall0, loop.time() - t_first)
            error, decision, frame, row_errors, usage = tried
            if self.per_request or (held.outcome is not None and held.outcome.hints is not None):
                limits.learned()  # (the limits learn a stated limit only from headers)
            now = loop.time()
            if error is None:
                assert frame is not None and usage is not None
                limits.latencies.append(now - t_call)
                limits.tail.observe(batch.tokens, now - t_call, batch)
                if limits.sizer is not None:
                    limits.sizer.observe(ok=True, latency_s=now - t_call)
                return Answered(frame, row_errors, wall0, now - t_first, usage)
            assert decision is not None
            if decision.kind == "fatal_run":
                return GaveUp(fatal_message(error, decision), False, wall0, now - t_first,
                              fatal=True, kept=_answered_rows(error, batch, self, wall0,
                                                              now - t_first),
                              first=limits.breaker is not None
                              and limits.breaker.is_stop(error))
            if limits.sizer is not None and size_related(error, decision.status) and not (
                    decision.cause == "timeout" and self._hung_call(batch, now - t_call)):
                limits.sizer.observe(ok=False, latency_s=now - t_call)
            if budget is None:
                budget = AttemptBudget(cfg.max_attempts)
            last = error
            if budget.may_retry(decision, now=now):
                delay = backoff(attempt, base=cfg.backoff_base, cap=cfg.backoff_max,
                                retry_after=decision.retry_after, rng=self.rng)
                self.report.event(batch, BatchRetried(now, batch.id, a, batch.tokens, attempt,
                                                      delay, describe(error),
                                                      decision.rate_limited))
                slot.release()  # sleep off the retry without holding one of the agent's slots
                if limits.breaker is None:
                    await asyncio.sleep(delay)
                else:
                    try:  # (cut short when the run stops: no progress for outage_timeout)
                        await limits.breaker.sleep(delay)
                    except BaseException as exc:
                        if not limits.breaker.is_stop(exc):
                            raise
                        return self._stopped(exc, error, batch, wall0, loop.time() - t_first)
                await slot.reacquire()
                continue
            kept = _partly_answered(error, batch, self, wall0, now - t_first)
            if kept is not None:  # rows answered before the batch failed keep their answers
                return kept
            bisect = ((decision.kind == "row" and decision.bisect) or self._hung(decision)
                      or (isinstance(error, WorkerDiedError) and error.rows_suspect))
            return GaveUp(describe(error), bisect, wall0, now - t_first)

    def _stopped(self, stop: BaseException, last: BaseException | None, batch: Batch,
                 wall0: float, elapsed: float) -> GaveUp:
        """The verdict of a batch the breaker stopped before its next try (another call found
        that the run cannot succeed): the run's error, and the rows its last failed try had
        answered (a 5xx or 429 after some rows' answers, ``attach_partial``: paid for)."""
        kept = None if last is None else _answered_rows(last, batch, self, wall0, elapsed)
        return GaveUp(fatal_message(stop), False, wall0, elapsed, fatal=True, kept=kept,
                      first=True)

    def _answered(self, value: Any, used: _usage.Usage, batch: Batch, t0: float, held: Hold,
                  ticket: Pass, seq: int, first_sent: float) -> _Tried:
        """fn returned ``value`` (a try that began at ``t0``): its outputs; tell the limits
        (``held.outcome``) and the breaker. Outputs fn may not return fail the try."""
        try:
            frame, row_errors = normalize(value, len(batch.rows), self.cfg.columns.output,
                                          reserved=self.reserved)
        except Exception as exc:
            return self._failed(exc, batch, t0, held, ticket, seq, first_sent)
        actual = used.input_tokens + used.output_tokens if used.input_tokens else None
        hints = parse_headers(used.headers) if used.headers else None
        held.outcome = Outcome(True, actual_tokens=actual, started_seq=seq,
                               hints=None if hints is None or hints.empty else hints)
        ticket.record("ok")
        return None, None, frame, row_errors, used

    def _failed(self, exc: Exception, batch: Batch, t0: float, held: Hold, ticket: Pass,
                seq: int, first_sent: float) -> _Tried:
        """A try that began at ``t0`` failed with ``exc``: its decision; tell the limits and
        the breaker (an outage-like failure counts against the service per
        ``_blames_service``)."""
        limits = self.limits
        decision = classify(exc, self.cfg.retry_on)
        # a call of an ordinary size that timed out hung: not a sign of overload
        hung = self._hung_call(batch, asyncio.get_running_loop().time() - t0)
        held.outcome = Outcome(False, decision.rate_limited,
                               decision.cause == "timeout" and not hung,
                               decision.retry_after, None, seq,
                               overloaded=decision.overloaded,
                               hints=None if decision.hints.empty else decision.hints)
        if not decision.outage:
            ticket.record("other")
        elif decision.cause == "connection" or self._blames_service(batch, first_sent) or (
                ticket.ticket is not None and ticket.ticket.probe):
            # (no row causes a refused connection; a failed probe keeps the breaker open)
            ticket.record("outage")
        # else: a 5xx or a timeout while the service answered other calls since this batch
        # was first sent, or of a half made by bisection: its rows, not the service
        if decision.kind == "fatal_run" and limits.breaker is not None:
            limits.breaker.stop(exc)  # no later call of the run goes out
        return exc, decision, None, None, None

    def _hung_call(self, batch: Batch, elapsed: float) -> bool:
        """A call of an ordinary size that ran into dfbatch's own timeout hung (it says nothing
        about size or overload); a timeout that fn raised early is the upstream's word."""
        timeout = self.cfg.timeout
        return (timeout is not None and elapsed >= 0.9 * timeout
                and self.limits.tail.ordinary_within(batch.tokens, timeout))

    def _blames_service(self, batch: Batch, first_sent: float) -> bool:
        """May this attempt's 5xx or timeout count as the service being down? Not when the
        service answered other calls since this batch was first sent, nor for a half made by
        bisection (split because the service answered others): then its rows are at fault,
        and a tail of such batches must neither open the breaker nor stop the run
        (``outage_timeout``). An outage is seen in the batches sent after it began (and in
        every refused connection)."""
        breaker = self.limits.breaker
        return not batch.frozen and (breaker is None or breaker.last_ok < first_sent)

    def _hung(self, decision: Decision) -> bool:
        """Every try timed out while the service answers others: a row may hang it (or the
        batch is too big); split it. Not while the breaker says the service is down."""
        breaker = self.limits.breaker
        return decision.cause == "timeout" and (breaker is None or breaker.closed)

    def _race(self, task: asyncio.Task[Any], t0: float, args: tuple[int, Batch, pl.DataFrame,
              Cost]) -> Race[tuple[Any, _usage.Usage]]:
        """The race of a call that got late enough for a decision (built only then)."""
        a, batch, df, cost = args
        limits, tail, q, budget = self.limits, self.limits.tail, self._q, self.cfg.hedge_budget
        sent: list[bool] = []  # the hedge got its limits and went out

        def may_hedge(queued: bool) -> bool:
            return tail.may_hedge(budget, queued=queued, rates=(limits.tpm, limits.rpm),
                                  units=(cost.tokens, cost.requests))

        return Race(task.get_loop(), task, t0,
                     lambda: self._hedge_call(a, batch, df, cost, sent),
                     lambda: tail.plan(batch.tokens, q, budget), self._waiting, may_hedge,
                     lambda age: tail.may_restart(budget, batch, batch.tokens, age),
                     lambda: bool(sent))

    async def _hedge_call(self, a: int, batch: Batch, df: pl.DataFrame, cost: Cost,
                          sent: list[bool]) -> tuple[Any, _usage.Usage]:
        async with self.stack.hold(cost) as held:
            sent.append(True)
            # reported once the duplicate is really sent: a hedge is one more attempt per row
            self.report.event(batch, BatchHedged(asyncio.get_running_loop().time(), batch.id, a))
            task = asyncio.current_task()  # (the hedge's own task)
            assert task is not None
            result = await self._call(batch, df, task)
            held.outcome = Outcome(True)
            return result


def _check_pickles(fn: Callable[..., Any]) -> None:
    """Can worker processes get ``fn``? It must pickle, and be importable by them: not defined
    in the ``__main__`` of a notebook, REPL or stdin (a worker cannot import that)."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    main = sys.modules.get("__main__")
    where = getattr(main, "__file__", None)
    if module == "__main__" and not (where and os.path.isfile(where)):
        msg = (f"executor='process' sends fn to worker processes, but {fn!r} is defined in "
               "an interactive session (a notebook, a REPL or stdin), which they cannot "
               "import; move it to a .py module and import it, or use executor='thread'")
        raise ConfigError(msg)
    try:
        pickle.dumps(fn)
    except Exception as exc:
        msg = (f"executor='process' sends fn to worker processes, but {fn!r} does not pickle "
               f"({type(exc).__name__}: {exc}); define it at module level in an importable "
               "module, or use executor='thread'")
        raise ConfigError(msg) from exc
    check_importable(fn)


def _partly_answered(error: BaseException, batch: Batch, caller: FnCaller, wall0: float,
                     elapsed: float) -> Answered | None:
    """The verdict of a batch given up on whose last error carries answers (``attach_partial``):
    the answered rows keep them, the others get ``error``; no bisection."""
    partial = partial_of(error)
    if partial is None or len(partial.values) != len(batch.rows):
        return None
    try:
        frame, row_errors = normalize(partial.outputs(error), len(batch.rows),
                                      caller.cfg.columns.output, reserved=caller.reserved)
    except OutputError:
        return None
    used = _usage.Usage(partial.input_tokens, partial.output_tokens)
    return Answered(frame, row_errors, wall0, elapsed, used)


def _answered_rows(error: BaseException, batch: Batch, caller: FnCaller, wall0: float,
                   elapsed: float) -> tuple[np.ndarray, Answered] | None:
    """The rows of a batch that stops the run (a refused key, no quota ...) that were answered
    before it (``attach_partial``: paid for), and their answers; None when there are none."""
    partial = partial_of(error)
    if partial is None or len(partial.values) != len(batch.rows):
        return None
    where = np.flatnonzero(np.asarray(partial.answered, dtype=bool))
    try:
        frame, row_errors = normalize([partial.values[i] for i in where.tolist()], len(where),
                                      caller.cfg.columns.output, reserved=caller.reserved)
    except OutputError:
        return None
    used = _usage.Usage(partial.input_tokens, partial.output_tokens)
    return where, Answered(frame, row_errors, wall0, elapsed, used)

