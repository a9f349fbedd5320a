"""What a run remembers: per-row outcomes, the events it emits, the checkpoint journal hook.

The caller reports how a batch went (``started``, ``event``, and a final ``Answered`` /
``GaveUp`` verdict); the recorder stamps the batch's rows in ``Outcomes`` (what the result frame
is assembled from: a batch's attempts are counted on the batch, its stamp is written to the
per-row arrays in bulk with others), emits the matching ``BatchStarted`` / ``BatchFinished`` /
``BatchFailed`` event and hands finished batches to the journal (``on_batch_done``). A live
view listens through ``tally`` (a ``StatsAccumulator``): the recorder keeps the calls in
flight in a dict the tally reads at snapshot time (``live``: a call's start costs one dict
write), appends each answered call's fields to a list the tally folds when it is read, and
tells it of other ends from their fields (no event object is built for it); ``emit`` gets the
events, for ``on_event`` subscribers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from dfbatch.events import (
    BatchFailed,
    BatchFinished,
    BatchHedged,
    BatchRetried,
    BatchStarted,
    Event,
    LiveCalls,
)
from dfbatch.events._live import PENDING, Answer
from dfbatch.execute import _usage
from dfbatch.execute._outputs import Output, as_frame
from dfbatch.execute._pieces import Pieces
from dfbatch.execute._rowerrors import RowErrors
from dfbatch.execute._scheduler import Batch

CANCELLED = "cancelled"


STAMPS = 1024  # batches' stamps gathered before they are written to the per-row arrays


class _Flushed:
    """An array of ``Outcomes`` (kept as ``_<name>``), read or replaced after the pending
    stamps are written (``Outcomes.flush``): every read sees every batch stamped so far."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, obj: Outcomes | None, owner: type | None = None) -> np.ndarray:
        if obj is None:  # (looked up on the class)
            return self  # type: ignore[return-value]
        obj.flush()
        return getattr(obj, self.attr)  # type: ignore[no-any-return]

    def __set__(self, obj: Outcomes, value: np.ndarray) -> None:
        obj.flush()
        setattr(obj, self.attr, value)


class Outcomes:
    """Per-row state of a run: what the result frame is assembled from.

    The pool stamps each finished contiguous batch once (``stamp``: a tuple appended, not five
    array writes); the stamps are written to the per-row arrays in bulk, every ``STAMPS``
    batches and whenever an array is read, so every read sees every batch stamped so far.

    Examples
    --------
    >>> o = Outcomes(6)
    >>> o.stamp(2, 3, 7, 1, 1.5, 0.25, 2)  # batch 7 (agent 1, 2 attempts): rows 2..4
    >>> o.attempts.tolist(), o.run_batch.tolist(), o.done.tolist()
    ([0, 0, 2, 2, 2, 0], [0, 0, 7, 7, 7, 0], [False, False, True, True, True, False])
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._attempts = np.zeros(n, np.uint16)
        self._run_batch = np.zeros(n, np.uint32)
        self._run_agent = np.zeros(n, np.uint16)
        self._started = np.full(n, np.nan)  # epoch seconds, NaN = never ran
        self._elapsed = np.full(n, np.nan)
        self._done = np.zeros(n, bool)
        self._log: list[tuple[int, int, int, int, float, float, int]] = []
        self.errors = RowErrors(n)  # (sparse while few rows have one)
        self.kept = Pieces()  # outputs (``pieces``)
        self.last: tuple[np.ndarray, Output] | None = None  # for output_of

    def __repr__(self) -> str:
        return f"Outcomes(n={self.n}, done={int(self.done.sum())})"

    def stamp(self, at: int, n: int, batch_id: int, agent: int, wall0: float,
              elapsed: float, attempts: int) -> None:
        """Rows ``at .. at + n`` ran in ``batch_id`` on ``agent`` and are done; they took
        ``attempts`` more attempts."""
        log = self._log
        log.append((at, n, batch_id, agent, wall0, elapsed, attempts))
        if len(log) >= STAMPS:
            self.flush()

    def flush(self) -> None:
        """Write the gathered stamps to the per-row arrays."""
        log = self._log
        if not log:
            return
        self._log = []
        if len(log) < 8:
            for at, n, batch_id, agent, wall0, elapsed, attempts in log:
                self._write(slice(at, at + n), batch_id, agent, wall0, elapsed, attempts)
            return
        m = len(log)
        cols = np.fromiter(itertools.chain.from_iterable(log), np.float64, 7 * m).reshape(m, 7)
        starts, sizes = cols[:, 0].astype(np.int64), cols[:, 1].astype(np.int64)
        ends = np.cumsum(sizes)
        every = np.repeat(starts - (ends - sizes), sizes) + np.arange(ends[-1])
        self._attempts[every] += np.repeat(cols[:, 6].astype(np.uint16), sizes)
        self._run_batch[every] = np.repeat(cols[:, 2].astype(np.uint32), sizes)
        self._run_agent[every] = np.repeat(cols[:, 3].astype(np.uint16), sizes)
        self._started[every] = np.repeat(cols[:, 4], sizes)
        self._elapsed[every] = np.repeat(cols[:, 5], sizes)
        self._done[every] = True

    # the per-row arrays, read (or replaced) once the pending stamps are written
    attempts = _Flushed()
    run_batch = _Flushed()
    run_agent = _Flushed()
    started = _Flushed()  # epoch seconds, NaN = never ran
    elapsed = _Flushed()
    done = _Flushed()

    def stamp_rows(self, rows: np.ndarray | slice, batch_id: int, agent: int, wall0: float,
                   elapsed: float, attempts: int) -> None:
        """``stamp`` for rows that are not one range (written at once)."""
        self.flush()
        self._write(rows, batch_id, agent, wall0, elapsed, attempts)

    def _write(self, rows: np.ndarray | slice, batch_id: int, agent: int, wall0: float,
               elapsed: float, attempts: int) -> None:
        self._attempts[rows] += np.uint16(attempts)
        self._run_batch[rows] = batch_id
        self._run_agent[rows] = agent
        self._started[rows] = wall0
        self._elapsed[rows] = elapsed
        self._done[rows] = True

    def add_attempts(self, rows: np.ndarray | slice, attempts: int) -> None:
        """Rows that took ``attempts`` more attempts in a batch that is not done with them
        (bisected, stopped, cancelled)."""
        self._attempts[rows] += np.uint16(attempts)  # (a sum: no need to flush first)

    @property
    def pieces(self) -> list[tuple[np.ndarray, Output]]:
        """The outputs: (rows, output) pairs in the order batches were answered."""
        return self.kept.items()

    @pieces.setter
    def pieces(self, items: list[tuple[np.ndarray, Output]]) -> None:
        self.kept = Pieces(items)

    def output_of(self, rows: np.ndarray, since: int) -> tuple[pl.DataFrame | None, int]:
        """The output frame recorded for the batch of ``rows`` just finished (None for a failed
        batch); ``since`` is passed back unchanged (kept for the hooks' calls)."""
        got = self.last
        if got is not None and (got[0] is rows or (
                len(got[0]) == len(rows) and np.array_equal(got[0], rows))):
            return as_frame(got[1]), since
        return None, since

    def reordered(self, order: np.ndarray) -> Outcomes:
        """These outcomes, kept by run position, in the frame's order (``order[i]``: where
        run position ``i`` is in the frame)."""
        return self.placed(self.n, order)

    def placed(self, n: int, at: np.ndarray) -> Outcomes:
        """These outcomes placed at positions ``at`` of ``n`` rows (the rest never ran): the
        pool's rows put back among the rows a checkpoint or a cache already held."""
        out = Outcomes(n)
        for mine, theirs in ((out._attempts, self.attempts), (out._run_batch, self.run_batch),
                             (out._run_agent, self.run_agent), (out._started, self.started),
                             (out._elapsed, self.elapsed), (out._done, self.done)):
            mine[at] = theirs
        out.errors = self.errors.placed(n, at)
        out.pieces = [(at[rows], frame) for rows, frame in self.pieces]
        return out


@dataclass(slots=True)
class Answered:
    """fn answered: one output per row (``frame``), some rows may carry their own error."""

    frame: Output
    row_errors: list[str | None] | None
    wall0: float
    elapsed: float
    used: _usage.Usage


@dataclass(slots=True)
class GaveUp:
    """Every attempt failed; ``bisect``: splitting the batch may isolate the bad row;
    ``fatal``: no call of the run can succeed (a refused key …): the run stops with ``error``."""

    error: str
    bisect: bool
    wall0: float
    elapsed: float
    fatal: bool = False
    # (fatal) the rows answered before the run stopped (their positions in the batch) and
    # their answers: recorded, so that neither the partial result nor a resume loses them
    kept: tuple[np.ndarray, Answered] | None = None
    # (fatal) ``error`` is the error that stopped the run (the breaker's, or a copy of it),
    # not a later one of another kind from a call sent before the stop: the first cause
    first: bool = False


Verdict = Answered | GaveUp


class Tally(Protocol):
    """What counts each batch's calls from their fields (``StatsAccumulator``'s methods)."""

    def watch(self, live: LiveCalls) -> Callable[[], None] | None:
        """Read ``live`` (kept by the recorder) when counting; returns what to call at each
        call's start and answer (or None)."""
        ...

    def drain(self) -> None:
        """Fold the answers appended to ``live.answered``."""
        ...

    def call_failed(self, t: float, agent_id: int, rows: int, tokens: int, elapsed_s: float,
                    *, bisected: bool = False, called: bool = True) -> None: ...

    def call_retried(self, ev: BatchRetried) -> None: ...

    def apply(self, ev: Event) -> None: ...


class Recorder:
    """Turns what happened to each batch into ``Outcomes`` rows and events."""

    def __init__(self, n_rows: int, emit: Callable[[Event], None] | None,
                 on_batch_done: Callable[[Batch, Outcomes], None] | None = None) -> None:
        self.out = Outcomes(n_rows)
        self.emit = emit  # None: nobody listens, no event is built
        self.tally: Tally | None = None
        self.live: LiveCalls | None = None  # the calls in flight, while a tally listens
        self._calls: dict[int, tuple[float, int, int]] | None = None  # (live.calls)
        self._answers: list[Answer] = []  # (live.answered)
        self._on_call: Callable[[], None] | None = None
        self._clock: Callable[[], float] | None = None
        self.on_batch_done = on_batch_done

    def listen(self, tally: Tally | None, emit: Callable[[Event], None] | None) -> None:
        """Who hears of each batch: ``tally``, counted from the batch's fields without an
        event (a live view: it ``watch``es the calls in flight this recorder keeps in
        ``live``), and ``emit``, which gets the events (``on_event``)."""
        self.tally, self.emit = tally, emit
        self.live = self._on_call = self._calls = None
        if tally is not None:
            self.live = LiveCalls()
            self._on_call = tally.watch(self.live)
            self._calls, self._answers = self.live.calls, self.live.answered

    def _bind_clock(self) -> Callable[[], float]:
        """The running loop's clock (the events' ``t``), bound once."""
        loop = asyncio.get_running_loop()
        # asyncio's own loops read time.monotonic: call it without the method around it
        own = type(loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if own else loop.time
        return self._clock

    def started(self, a: int, batch: Batch, attempt: int, t: float) -> None:
        batch.tries += 1  # (counted per batch, stamped on its rows when it is over)
        calls = self._calls
        if calls is not None:  # (every start has an end: the entry goes then)
            calls[batch.id] = (t, a, batch.tokens)
            if self._on_call is not None:
                self._on_call()
        if self.emit is not None:
            self.emit(BatchStarted(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                   batch.tokens, attempt))

    def event(self, batch: Batch, ev: Event) -> None:
        """An event from the caller (retried, hedged); a hedge is one more attempt per row."""
        if isinstance(ev, BatchHedged):
            batch.tries += 1
        if self.tally is not None:
            if isinstance(ev, BatchRetried):  # the call is over
                self._end(batch)
                self.tally.call_retried(ev)
            else:
                self.tally.apply(ev)
        if self.emit is not None:
            self.emit(ev)

    def settle(self, batch: Batch) -> None:
        """``batch`` is over without a verdict on its rows (bisected, stopped, cancelled):
        count its attempts on them."""
        if batch.tries:
            self.out.add_attempts(batch.index, batch.tries)
            batch.tries = 0

    def bisected(self, a: int, batch: Batch, error: str, elapsed: float) -> None:
        self.settle(batch)
        if self.tally is None and self.emit is None:
            return
        t = (self._clock or self._bind_clock())()
        if self.tally is not None:
            self.tally.call_failed(t, a, len(batch.rows), batch.tokens, elapsed, bisected=True,
                                   called=self._end(batch))
        if self.emit is not None:
            self.emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                  batch.tokens, elapsed, error, bisected=True))

    def answered(self, a: int, batch: Batch, v: Answered) -> None:
        rows, at, o = batch.rows, batch.at, self.out
        if at >= 0:  # (Outcomes.stamp, inline: the common case)
            log = o._log
            log.append((at, len(rows), batch.id, a, v.wall0, v.elapsed, batch.tries))
            batch.tries = 0
            if len(log) >= STAMPS:
                o.flush()
        else:
            self._stamp(a, batch, v.wall0, v.elapsed)
        o.kept.add(rows, at, v.frame)
        if self.on_batch_done is not None:
            o.last = (rows, v.frame)  # (the hooks' output_of)
        n_err = 0
        if v.row_errors is not None:
            errors = o.errors
            for i, err in zip(rows.tolist(), v.row_errors, strict=True):
                errors[i] = err
                n_err += err is not None
        tally, emit = self.tally, self.emit
        if tally is not None or emit is not None:
            t, n = (self._clock or self._bind_clock())(), len(rows)
            calls = self._calls
            if tally is not None and calls is not None:
                calls.pop(batch.id, None)
                answers = self._answers
                answers.append((t, a, batch.planned_agent, n, batch.tokens, v.elapsed, n_err,
                                v.used))
                if len(answers) >= PENDING:
                    tally.drain()
                if self._on_call is not None:
                    self._on_call()
            if emit is not None:
                emit(BatchFinished(t, batch.id, a, batch.planned_agent, n, batch.tokens,
                                   v.elapsed, n - n_err, n_err, v.used.input_tokens,
                                   v.used.output_tokens))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, o)

    def failed(self, a: int, batch: Batch, msg: str, wall0: float, elapsed: float) -> None:
        self._stamp(a, batch, wall0, elapsed)
        self.out.last = None
        for i in batch.rows.tolist():
            self.out.errors[i] = msg
        tally, emit = self.tally, self.emit
        if tally is not None or emit is not None:
            t = (self._clock or self._bind_clock())()
            if tally is not None:
                tally.call_failed(t, a, len(batch.rows), batch.tokens, elapsed,
                                  called=self._end(batch))
            if emit is not None:
                emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                 batch.tokens, elapsed, msg))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, self.out)

    def _end(self, batch: Batch) -> bool:
        """``batch``'s call is over: no longer in flight (false: it had none)."""
        return self._calls is not None and self._calls.pop(batch.id, None) is not None

    def mark_unfinished(self) -> None:
        for i in np.flatnonzero(~self.out.done).tolist():
            self.out.errors[i] = CANCELLED

    @property
    def unfinished(self) -> int:
        return int((~self.out.done).sum())

    def _stamp(self, a: int, batch: Batch, wall0: float, elapsed: float) -> None:
        tries, batch.tries = batch.tries, 0
        if batch.at >= 0:
            self.out.stamp(batch.at, len(batch.rows), batch.id, a, wall0, elapsed, tries)
        else:
            self.out.stamp_rows(batch.rows, batch.id, a, wall0, elapsed, tries)
