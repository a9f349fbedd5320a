"""What a run remembers: per-row outcomes, the events it emits, the checkpoint journal hook.

The caller reports how a batch went (``started``, ``event``, and a final ``Answered`` /
``GaveUp`` verdict); the recorder stamps the batch's rows in ``Outcomes`` (what the result frame
is assembled from), emits the matching ``BatchStarted`` / ``BatchFinished`` / ``BatchFailed``
event and hands finished batches to the journal (``on_batch_done``). A live view listens
through ``tally`` (a ``StatsAccumulator`` told each batch's fields: no event object is built
for it); ``emit`` gets the events, for ``on_event`` subscribers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl

from dfbatch.events import BatchFailed, BatchFinished, BatchHedged, BatchStarted, Event
from dfbatch.execute import _usage
from dfbatch.execute._outputs import Output, as_frame
from dfbatch.execute._pieces import Pieces
from dfbatch.execute._rowerrors import RowErrors
from dfbatch.execute._scheduler import Batch

CANCELLED = "cancelled"


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
    errors: RowErrors = field(init=False)  # (sparse while few rows have one)
    kept: Pieces = field(default_factory=Pieces, repr=False)  # outputs (``pieces``)
    last: tuple[np.ndarray, Output] | None = field(default=None, repr=False)  # for output_of

    def __post_init__(self) -> None:
        self.attempts = np.zeros(self.n, np.uint16)
        self.run_batch = np.zeros(self.n, np.uint32)
        self.run_agent = np.zeros(self.n, np.uint16)
        self.started = np.full(self.n, np.nan)
        self.elapsed = np.full(self.n, np.nan)
        self.done = np.zeros(self.n, bool)
        self.errors = RowErrors(self.n)

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
        for mine, theirs in ((out.attempts, self.attempts), (out.run_batch, self.run_batch),
                             (out.run_agent, self.run_agent), (out.started, self.started),
                             (out.elapsed, self.elapsed), (out.done, self.done)):
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


Verdict = Answered | GaveUp


class Tally(Protocol):
    """What counts each batch's calls from their fields (``StatsAccumulator``'s methods)."""

    def batch_started(self, t: float, batch_id: int, agent_id: int, tokens: int) -> None: ...

    def batch_finished(self, t: float, batch_id: int, agent_id: int, planned_agent: int,
                       rows: int, tokens: int, elapsed_s: float, ok_rows: int, error_rows: int,
                       input_tokens: int = 0, output_tokens: int = 0) -> None: ...

    def batch_failed(self, t: float, batch_id: int, agent_id: int, rows: int, tokens: int,
                     elapsed_s: float, *, bisected: bool = False) -> None: ...

    def apply(self, ev: Event) -> None: ...


class Recorder:
    """Turns what happened to each batch into ``Outcomes`` rows and events."""

    def __init__(self, n_rows: int, emit: Callable[[Event], None] | None,
                 on_batch_done: Callable[[Batch, Outcomes], None] | None = None) -> None:
        self.out = Outcomes(n_rows)
        self.emit = emit  # None: nobody listens, no event is built
        self.tally: Tally | None = None
        self._clock: Callable[[], float] | None = None
        self.on_batch_done = on_batch_done

    def listen(self, tally: Tally | None, emit: Callable[[Event], None] | None) -> None:
        """Who hears of each batch: ``tally``, counted from the batch's fields without an
        event (a live view), and ``emit``, which gets the events (``on_event``)."""
        self.tally, self.emit = tally, emit

    def _bind_clock(self) -> Callable[[], float]:
        """The running loop's clock (the events' ``t``), bound once."""
        loop = asyncio.get_running_loop()
        # asyncio's own loops read time.monotonic: call it without the method around it
        own = type(loop).time is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if own else loop.time
        return self._clock

    def started(self, a: int, batch: Batch, attempt: int, t: float) -> None:
        self.out.attempts[batch.index] += 1
        if self.tally is not None:
            self.tally.batch_started(t, batch.id, a, batch.tokens)
        if self.emit is not None:
            self.emit(BatchStarted(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                   batch.tokens, attempt))

    def event(self, batch: Batch, ev: Event) -> None:
        """An event from the caller (retried, hedged); a hedge is one more attempt per row."""
        if isinstance(ev, BatchHedged):
            self.out.attempts[batch.index] += 1
        if self.tally is not None:
            self.tally.apply(ev)
        if self.emit is not None:
            self.emit(ev)

    def bisected(self, a: int, batch: Batch, error: str, elapsed: float) -> None:
        if self.tally is None and self.emit is None:
            return
        t = (self._clock or self._bind_clock())()
        if self.tally is not None:
            self.tally.batch_failed(t, batch.id, a, len(batch.rows), batch.tokens, elapsed,
                                    bisected=True)
        if self.emit is not None:
            self.emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                  batch.tokens, elapsed, error, bisected=True))

    def answered(self, a: int, batch: Batch, v: Answered) -> None:
        self._stamp(a, batch, v.wall0, v.elapsed)
        self.out.kept.add(batch.rows, batch.at, v.frame)
        self.out.last = (batch.rows, v.frame)  # (the hooks' output_of)
        n_err = 0
        if v.row_errors is not None:
            for i, err in zip(batch.rows.tolist(), v.row_errors, strict=True):
                self.out.errors[i] = err
                n_err += err is not None
        tally, emit = self.tally, self.emit
        if tally is not None or emit is not None:
            t, n = (self._clock or self._bind_clock())(), len(batch.rows)
            if tally is not None:
                tally.batch_finished(t, batch.id, a, batch.planned_agent, n, batch.tokens,
                                     v.elapsed, n - n_err, n_err, v.used.input_tokens,
                                     v.used.output_tokens)
            if emit is not None:
                emit(BatchFinished(t, batch.id, a, batch.planned_agent, n, batch.tokens,
                                   v.elapsed, n - n_err, n_err, v.used.input_tokens,
                                   v.used.output_tokens))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, self.out)

    def failed(self, a: int, batch: Batch, msg: str, wall0: float, elapsed: float) -> None:
        self._stamp(a, batch, wall0, elapsed)
        self.out.last = None
        for i in batch.rows.tolist():
            self.out.errors[i] = msg
        tally, emit = self.tally, self.emit
        if tally is not None or emit is not None:
            t = (self._clock or self._bind_clock())()
            if tally is not None:
                tally.batch_failed(t, batch.id, a, len(batch.rows), batch.tokens, elapsed)
            if emit is not None:
                emit(BatchFailed(t, batch.id, a, batch.planned_agent, len(batch.rows),
                                 batch.tokens, elapsed, msg))
        if self.on_batch_done is not None:
            self.on_batch_done(batch, self.out)

    def mark_unfinished(self) -> None:
        for i in np.flatnonzero(~self.out.done).tolist():
            self.out.errors[i] = CANCELLED

    @property
    def unfinished(self) -> int:
        return int((~self.out.done).sum())

    def _stamp(self, a: int, batch: Batch, wall0: float, elapsed: float) -> None:
        rows, o = batch.index, self.out
        o.run_batch[rows] = batch.id
        o.run_agent[rows] = a
        o.started[rows] = wall0
        o.elapsed[rows] = elapsed
        o.done[rows] = True
