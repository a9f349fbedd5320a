"""The async agent pool: per-agent deques of batches, work stealing, limits, retries, bisection.

Each agent runs up to ``max_concurrent_batches`` batches at once, first from its own deque
(heaviest first), then, when ``steal`` is on, from the agent with the most queued work. Every
call passes the stacked limits (global in-flight cap, adaptive AIMD, RPM, TPM, bytes per agent),
runs with a timeout, and ends as a value: outputs, a retry after a jittered backoff, a bisection
of a multi-row batch that failed for good, or an error on its rows. The pool owns every task it
starts; cancelling ``run()`` (Ctrl-C) or ``stop()`` (the Stop button) cancels calls in flight and
marks unfinished rows ``"cancelled"``.

The pool slices the frame it is given and knows nothing else about Polars; ``run.py`` prepares
the batches and ``result.py`` assembles the result.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import OutputError
from dfbatch.events import (
    BatchFailed,
    BatchFinished,
    BatchHedged,
    BatchRetried,
    BatchStarted,
    Event,
)
from dfbatch.execute import _usage
from dfbatch.execute._limits import (
    AdaptiveLimit,
    CapacityLimit,
    Cost,
    Limit,
    Limits,
    Outcome,
    RateLimit,
)
from dfbatch.execute._outputs import normalize
from dfbatch.execute._retry import backoff, classify, describe
from dfbatch.execute._sizing import BatchSizer

CANCELLED = "cancelled"
_ONE = Cost()


@dataclass(slots=True)
class Batch:
    """Rows (positions in the frame) that go to fn in one call."""

    id: int
    planned_agent: int
    rows: np.ndarray
    tokens: int  # request tokens: overhead + row tokens + expected output
    nbytes: int
    call_anyway: bool = False  # a single oversize row sent under oversize="call"
    frozen: bool = False  # made by bisection: dynamic sizing never merges it back


@dataclass
class Outcomes:
    """Per-row state of a run: what the result frame is assembled from."""

    n: int
    attempts: np.ndarray = field(init=False)
    run_batch: np.ndarray = field(init=False)
    run_agent: np.ndarray = field(init=False)
    started: np.ndarray = field(init=False)  # epoch seconds, NaN = never ran
    elapsed: np.ndarray = field(init=False)
    done: np.ndarray = field(init=False)
    errors: list[str | None] = field(init=False)
    pieces: list[tuple[np.ndarray, pl.DataFrame]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.attempts = np.zeros(self.n, np.uint16)
        self.run_batch = np.zeros(self.n, np.uint32)
        self.run_agent = np.zeros(self.n, np.uint16)
        self.started = np.full(self.n, np.nan)
        self.elapsed = np.full(self.n, np.nan)
        self.done = np.zeros(self.n, bool)
        self.errors = [None] * self.n


class Pool:
    """Runs ``fn`` over ``batches`` (one list per agent). Use once: ``await pool.run()``."""

    def __init__(
        self,
        fn: Callable[[pl.DataFrame], Any],
        frame: pl.DataFrame,
        batches: list[list[Batch]],
        cfg: BatchConfig,
        *,
        row_tokens: np.ndarray,
        row_bytes: np.ndarray | None = None,
        emit: Callable[[Event], None],
        reserved: set[str],
        on_batch_done: Callable[[Batch, Outcomes], None] | None = None,
    ) -> None:
        self.fn = fn
        self.frame = frame
        self.cfg = cfg
        self.emit = emit
        self.reserved = reserved
        self.on_batch_done = on_batch_done
        self.row_tokens = row_tokens
        self.row_bytes = row_bytes
        self.out = Outcomes(frame.height)
        n_agents = len(batches)
        self.queues = [deque(sorted(q, key=lambda b: (-b.tokens, b.id))) for q in batches]
        self.queued_load = [sum(b.tokens for b in q) for q in self.queues]
        self.pending = sum(len(q) for q in self.queues)
        self.next_id = 1 + max((b.id for q in batches for b in q), default=-1)
        self.agent_slots = [CapacityLimit(cfg.max_concurrent_batches) for _ in range(n_agents)]
        self.agent_bytes = [
            CapacityLimit(cfg.max_bytes_per_agent, lambda c: c.nbytes) for _ in range(n_agents)
        ]
        self.global_slots = CapacityLimit(cfg.in_flight_cap)
        self.adaptive = AdaptiveLimit(cfg.in_flight_cap) if cfg.adaptive else None
        burst = cfg.rate_burst
        self.rpm = RateLimit(cfg.rpm, burst=burst) if cfg.rpm else None
        self.tpm = RateLimit(cfg.tpm, tokens=True, burst=burst) if cfg.tpm else None
        if self.adaptive is not None:
            self.adaptive.rate_known = self.rpm is not None or self.tpm is not None
        shared: list[Limit] = [self.global_slots]
        shared += [x for x in (self.adaptive, self.rpm, self.tpm) if x is not None]
        self.shared = Limits(shared)
        self.sizer = (
            BatchSizer(cfg.items_per_batch, max_items=max(6, cfg.items_per_batch),
                       target_latency_s=cfg.target_latency_s)
            if cfg.dynamic_batching else None
        )
        self.latencies: deque[float] = deque(maxlen=256)
        self.rng = random.Random(cfg.seed)
        self.is_async = _is_async(fn)
        self.executor: ThreadPoolExecutor | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.crash: BaseException | None = None
        self._wake: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None

    # -- public ----------------------------------------------------------------------------
    async def run(self) -> Outcomes:
        """Run to completion, or until ``stop()``: then unfinished rows are ``"cancelled"``.

        Cancelling the task running this cancels every call in flight and re-raises.
        """
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()
        if not self.is_async:
            workers = self.cfg.sync_workers or min(64, self.cfg.in_flight_cap)
            self.executor = ThreadPoolExecutor(workers, thread_name_prefix="dfbatch")
        agents = [asyncio.create_task(self._agent(a)) for a in range(len(self.queues))]
        try:
            if self.pending:
                await self._finished.wait()
        finally:
            self.stopping = True
            live = [*agents, *self.tasks]
            for task in live:
                task.cancel()
            await asyncio.gather(*live, return_exceptions=True)
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        if self.crash is not None:
            raise self.crash
        self._mark_unfinished()
        return self.out

    def stop(self) -> None:
        """Stop gracefully: start nothing new, cancel calls in flight, return what is done."""
        self.stopping = True
        if self._finished is not None:
            self._finished.set()

    @property
    def cancelled_rows(self) -> int:
        return int((~self.out.done).sum())

    # -- scheduling ------------------------------------------------------------------------
    async def _agent(self, a: int) -> None:
        slots = self.agent_slots[a]
        assert self._wake is not None
        while not self.stopping:
            await slots.acquire(_ONE)
            batch = self._take(a)
            if batch is None:
                # never hold a slot while idle: a batch in backoff needs it back
                slots.release(_ONE)
                if not self.pending:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            task = asyncio.create_task(self._run_batch(a, batch))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    def _take(self, a: int) -> Batch | None:
        """Next batch for agent ``a``: its own deque, else steal from the most loaded agent."""
        victim = a
        if not self.queues[a]:
            if not self.cfg.steal:
                return None
            victim = max(range(len(self.queues)), key=self.queued_load.__getitem__)
            if not self.queues[victim]:
                return None
        batch = self.queues[victim].popleft()
        self.queued_load[victim] -= batch.tokens
        return self._resize(victim, batch) if self.sizer is not None else batch

    def _resize(self, qi: int, batch: Batch) -> Batch:
        """Apply the dynamic target size: merge following pending batches, or split this one."""
        assert self.sizer is not None
        self.sizer.rate_bound = self._rate_bound()
        target, n = self.sizer.target, len(batch.rows)
        if batch.call_anyway or batch.frozen or n == target or target == self.sizer.initial:
            return batch
        if n > target:
            rest = [batch.rows[i:i + target] for i in range(target, n, target)]
            self._push_front(qi, [self._new_batch(batch, r) for r in rest])
            return self._new_batch(batch, batch.rows[:target])
        q, parts, overhead = self.queues[qi], [batch.rows], self.cfg.request_overhead_tokens
        tokens = batch.tokens
        while q and n + len(q[0].rows) <= target and not (q[0].call_anyway or q[0].frozen) and (
            tokens + q[0].tokens - overhead <= self.cfg.token_limit
        ):
            nxt = q.popleft()
            self.queued_load[qi] -= nxt.tokens
            self.pending -= 1  # merged into this batch
            parts.append(nxt.rows)
            tokens += nxt.tokens - overhead
            n += len(nxt.rows)
        return batch if len(parts) == 1 else self._new_batch(batch, np.concatenate(parts))

    def _rate_bound(self) -> bool:
        """Is the request rate the binding limit (so fewer, larger requests finish sooner)?"""
        if self.rpm is None or self.rpm.recent_wait < 1e-3:
            return False
        return self.tpm is None or self.rpm.recent_wait > 2 * self.tpm.recent_wait

    def _push_front(self, a: int, batches: list[Batch]) -> None:
        for b in reversed(batches):
            self.queues[a].appendleft(b)
            self.queued_load[a] += b.tokens
        self.pending += len(batches)
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.crash is None:
            self.crash = task.exception()  # a bug in dfbatch itself: surface it, do not hang
            self.stop()

    def _batch_over(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self._finished is not None:
            self._finished.set()
        self._notify()

    # -- one batch -------------------------------------------------------------------------
    async def _run_batch(self, a: int, batch: Batch) -> None:
        try:
            if self._presplit(a, batch):
                return
            await self._attempts(a, batch)
        finally:
            self.agent_slots[a].release(_ONE)
            self._batch_over()

    def _presplit(self, a: int, batch: Batch) -> bool:
        """Split a batch over ``token_limit`` before sending; refuse a lone oversize row."""
        if batch.tokens <= self.cfg.token_limit or batch.call_anyway:
            return False
        if len(batch.rows) > 1:
            self._push_front(a, self._halves(batch))
            return True
        msg = (
            f"oversize: the request for this row needs {batch.tokens} tokens > "
            f"token_limit={self.cfg.token_limit}; raise token_limit, shorten the text, or pass "
            "oversize='truncate' or oversize='call'"
        )
        self._record_error(a, batch, msg, time.time(), 0.0)
        return True

    async def _attempts(self, a: int, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        cost = Cost(tokens=batch.tokens, nbytes=batch.nbytes)
        wall0, t_first = time.time(), loop.time()
        for attempt in range(1, self.cfg.max_attempts + 1):
            await self.agent_bytes[a].acquire(cost)
            try:
                await self.shared.acquire(cost)
            except BaseException:
                self.agent_bytes[a].release(cost)
                raise
            seq = self.adaptive.next_seq() if self.adaptive else 0
            if attempt == 1:
                wall0, t_first = time.time(), loop.time()
            t_call = loop.time()
            self._started(a, batch, attempt, t_call)
            try:
                value, used = await self._call_hedged(a, batch, cost)
                frame, row_errors = normalize(
                    value, len(batch.rows), self.cfg.columns.output, reserved=self.reserved
                )
            except asyncio.CancelledError:
                self.shared.release(cost, None)
                self.agent_bytes[a].release(cost)
                raise
            except Exception as exc:
                decision = classify(exc, self.cfg.retry_on)
                timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError))
                self.shared.release(
                    cost,
                    Outcome(False, decision.rate_limited, timed_out, decision.retry_after,
                            None, seq),
                )
                self.agent_bytes[a].release(cost)
                elapsed = loop.time() - t_first
                if self.sizer is not None and _size_related(exc, decision.status):
                    self.sizer.observe(ok=False, latency_s=loop.time() - t_call)
                if decision.retry and attempt < self.cfg.max_attempts:
                    delay = backoff(attempt, base=self.cfg.backoff_base,
                                    cap=self.cfg.backoff_max, retry_after=decision.retry_after,
                                    rng=self.rng)
                    self.emit(BatchRetried(loop.time(), batch.id, a, batch.tokens, attempt,
                                           delay, describe(exc), decision.rate_limited))
                    await self._backoff(a, delay)
                    continue
                self._failed(a, batch, exc, wall0, elapsed)
                return
            actual = used.input_tokens + used.output_tokens if used.input_tokens else None
            self.shared.release(cost, Outcome(True, actual_tokens=actual, started_seq=seq))
            self.agent_bytes[a].release(cost)
            self.latencies.append(loop.time() - t_call)
            if self.sizer is not None:
                self.sizer.observe(ok=True, latency_s=loop.time() - t_call)
            if used.headers:
                self._learn_limits(used.headers)
                self._sync_limits(used.headers, cost)
            self._record_ok(a, batch, frame, row_errors, wall0, loop.time() - t_first, used)
            return

    async def _backoff(self, a: int, delay: float) -> None:
        """Sleep off a retry without holding one of the agent's concurrency slots."""
        slots = self.agent_slots[a]
        slots.release(_ONE)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            slots.force_acquire(_ONE)  # keep the caller's release balanced; never block here
            raise
        await slots.acquire(_ONE)

    async def _call_hedged(self, a: int, batch: Batch, cost: Cost) -> tuple[Any, _usage.Usage]:
        """Call fn; with ``hedge_after``, a straggler gets a duplicate and the first answer wins."""
        delay = self._hedge_delay()
        if delay is None:
            return await self._call(batch)
        first = asyncio.ensure_future(self._call(batch))
        tasks = {first}
        try:
            done, _ = await asyncio.wait(tasks, timeout=delay)
            if not done:
                loop = asyncio.get_running_loop()
                self.emit(BatchHedged(loop.time(), batch.id, a))
                self.out.attempts[batch.rows] += 1
                tasks.add(asyncio.ensure_future(self._hedge_call(batch, cost)))
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        return task.result()
            return first.result()  # every copy failed: raise the original call's error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _hedge_call(self, batch: Batch, cost: Cost) -> tuple[Any, _usage.Usage]:
        await self.shared.acquire(cost)
        ok = False
        try:
            result = await self._call(batch)
            ok = True
            return result
        finally:
            self.shared.release(cost, Outcome(ok) if ok else None)

    def _hedge_delay(self) -> float | None:
        """Hedge once latencies are known, and, under a TPM limit, only in the tail of the run
        (nothing queued), so duplicates never spend tokens that pending work needs."""
        q = self.cfg.hedge_after
        if q is None or len(self.latencies) < 20:
            return None
        if self.tpm is not None and any(self.queues):
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def _learn_limits(self, headers: dict[str, str]) -> None:
        """Adopt the provider's x-ratelimit-limit-* when the user configured no rpm / tpm."""
        lower = {k.lower(): v for k, v in headers.items()}
        for key, attr, tokens in (("x-ratelimit-limit-requests", "rpm", False),
                                  ("x-ratelimit-limit-tokens", "tpm", True)):
            if getattr(self, attr) is not None or key not in lower:
                continue
            try:
                per_minute = float(lower[key])
            except ValueError:
                continue
            if per_minute > 0:
                limit = RateLimit(per_minute, tokens=tokens, burst=self.cfg.rate_burst)
                setattr(self, attr, limit)
                self.shared.add(limit)

    def _sync_limits(self, headers: dict[str, str], cost: Cost) -> None:
        """``x-ratelimit-remaining-*`` says how full the provider's buckets really are."""
        lower = {k.lower(): v for k, v in headers.items()}
        for key, limit in (("x-ratelimit-remaining-requests", self.rpm),
                           ("x-ratelimit-remaining-tokens", self.tpm)):
            if limit is None or key not in lower:
                continue
            try:
                remaining = float(lower[key])
            except ValueError:
                continue
            limit.sync(remaining, cost)
        if self.adaptive is not None:
            self.adaptive.rate_known = self.rpm is not None or self.tpm is not None

    def _slice(self, batch: Batch) -> pl.DataFrame:
        """The rows fn gets for ``batch`` (a Ray engine actor holds each batch's own frame)."""
        rows = batch.rows
        n = len(rows)
        if n and rows[-1] - rows[0] == n - 1 and (n < 3 or bool((np.diff(rows) == 1).all())):
            return self.frame.slice(int(rows[0]), n)  # contiguous rows: a zero-copy slice
        return self.frame[rows]

    async def _call(self, batch: Batch) -> tuple[Any, _usage.Usage]:
        df = self._slice(batch)
        used, token = _usage.begin()
        try:
            if self.is_async:
                coro = self.fn(df)
            else:
                assert self.executor is not None
                ctx = contextvars.copy_context()
                loop = asyncio.get_running_loop()
                coro = loop.run_in_executor(self.executor, ctx.run, self.fn, df)
            value = await _timed(coro, self.cfg.timeout)
            if inspect.isawaitable(value):  # a plain function that returned a coroutine
                value = await _timed(value, self.cfg.timeout)
        finally:
            _usage.end(token)
        return value, used

    # -- recording -------------------------------------------------------------------------
    def _started(self, a: int, batch: Batch, attempt: int, t: float) -> None:
        self.out.attempts[batch.rows] += 1
        self.emit(BatchStarted(t, batch.id, a, batch.planned_agent, len(batch.rows),
                               batch.tokens, attempt))

    def _failed(self, a: int, batch: Batch, exc: Exception, wall0: float, elapsed: float) -> None:
        self._give_up(a, batch, describe(exc), not isinstance(exc, OutputError), wall0, elapsed)

    def _give_up(self, a: int, batch: Batch, error: str, bisect: bool, wall0: float,
                 elapsed: float) -> None:
        """The batch failed for good: bisect it (several rows, ``bisect``) or record the error."""
        t = asyncio.get_running_loop().time()
        if len(batch.rows) > 1 and bisect:
            self.emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                  batch.tokens, elapsed, error, bisected=True))
            self._push_front(a, self._halves(batch))
            return
        self._record_error(a, batch, error, wall0, elapsed)

    def _halves(self, batch: Batch) -> list[Batch]:
        mid = len(batch.rows) // 2
        halves = [self._new_batch(batch, rows) for rows in (batch.rows[:mid], batch.rows[mid:])]
        for half in halves:
            half.frozen = True
        return halves

    def _new_batch(self, parent: Batch, rows: np.ndarray) -> Batch:
        """A batch made of some rows of ``parent`` (split, bisected or merged), with a new id."""
        nbytes = int(self.row_bytes[rows].sum()) if self.row_bytes is not None else parent.nbytes
        self.next_id += 1
        return Batch(self.next_id - 1, parent.planned_agent, rows, self._tokens(rows), nbytes)

    def _tokens(self, rows: np.ndarray) -> int:
        per_row = self.cfg.output_tokens_per_row
        return int(self.cfg.request_overhead_tokens + self.row_tokens[rows].sum()
                   + per_row * len(rows))

    def _stamp(self, a: int, batch: Batch, wall0: float, elapsed: float) -> None:
        rows, o = batch.rows, self.out
        o.run_batch[rows] = batch.id
        o.run_agent[rows] = a
        o.started[rows] = wall0
        o.elapsed[rows] = elapsed
        o.done[rows] = True

    def _record_ok(self, a: int, batch: Batch, frame: pl.DataFrame,
                   row_errors: list[str | None] | None, wall0: float, elapsed: float,
                   used: _usage.Usage) -> None:
        self._stamp(a, batch, wall0, elapsed)
        self.out.pieces.append((batch.rows, frame))
        n_err = 0
        if row_errors is not None:
            for i, err in zip(batch.rows.tolist(), row_errors, strict=True):
                self.out.errors[i] = err
                n_err += err is not None
        t = asyncio.get_running_loop().time()
        self.emit(BatchFinished(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                batch.tokens, elapsed, len(batch.rows) - n_err, n_err,
                                used.input_tokens, used.output_tokens))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, self.out)

    def _record_error(self, a: int, batch: Batch, msg: str, wall0: float, elapsed: float) -> None:
        self._stamp(a, batch, wall0, elapsed)
        for i in batch.rows.tolist():
            self.out.errors[i] = msg
        t = asyncio.get_running_loop().time()
        self.emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                              batch.tokens, elapsed, msg))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, self.out)

    def _mark_unfinished(self) -> None:
        for i in np.flatnonzero(~self.out.done).tolist():
            self.out.errors[i] = CANCELLED


async def _timed(aw: Any, timeout: float | None) -> Any:
    """Await with a timeout, in this task (no extra task per call on Python >= 3.11)."""
    if sys.version_info < (3, 11):  # pragma: no cover
        return await asyncio.wait_for(aw, timeout)
    async with asyncio.timeout(timeout):
        return await aw


_SIZE_WORDS = ("context length", "context_length", "too many tokens", "too large", "maximum")


def _size_related(exc: BaseException, status: int | None) -> bool:
    """Could a smaller batch have avoided this error? (timeouts, 413, context-length 400s)"""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or status == 413:
        return True
    text = str(exc).lower()
    return status in (400, None) and any(w in text for w in _SIZE_WORDS)


def _is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
