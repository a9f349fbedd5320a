"""The fold from events to a run's counts: O(1) per event, a frozen snapshot on demand.

The pool tells a live view of each batch without building an event, and nothing at a call's
start: it keeps its calls in flight in a dict (batch id -> (start, agent, tokens)) that the
accumulator ``watch``es and reads at snapshot time, and appends each answered call's fields to
the accumulator's ``pending`` list (``Answer``: a tuple, no event), which is folded in order,
exactly as one call at a time would be, whenever anything reads or changes the counts
(``snapshot``, ``apply``, a failed or retried call) or every ``PENDING`` calls. Failed and
retried calls are told with ``call_failed`` / ``call_retried``; a watched call is counted as it
ends (so a start costs one dict write and nothing else). ``apply`` folds an event object
(``BatchStarted`` ... from a replay, the Batch API, tests) through ``batch_started`` /
``batch_finished`` / ``batch_failed``, which keep their own count of calls in flight. The counts
and what ``snapshot`` computes from them at the display's frame rate (the agents' sums,
percentiles, the oldest call in flight) are ``events._counts.RunCounts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dfbatch.events._counts import AgentCounts, RunCounts
from dfbatch.events._events import (
    BatchFailed,
    BatchFinished,
    BatchHedged,
    BatchRetried,
    BatchStarted,
    Event,
    RunFinished,
    RunStarted,
)
from dfbatch.events._live import NOTHING_USED, PENDING, Answer, LiveCalls, Tokens
from dfbatch.events._stats import RunStats
from dfbatch.job_events import JobUpdated


@dataclass(slots=True)
class StatsAccumulator(RunCounts):
    """Folds events one at a time (O(1) each); ``snapshot()`` freezes the state into RunStats.

    ``apply(event)`` folds any event; ``batch_started`` / ``batch_finished`` /
    ``batch_failed`` fold a batch's call from its fields, without an event object (what the
    pool calls when a live view listens).

    Examples
    --------
    >>> acc = StatsAccumulator()
    >>> acc.apply(RunStarted(t=0.0, total_rows=8, total_batches=2, total_tokens=80,
    ...                      planned_tokens=(80,)))
    >>> acc.batch_started(0.0, batch_id=0, agent_id=0, tokens=40)
    >>> acc.batch_finished(1.5, 0, 0, 0, rows=4, tokens=40, elapsed_s=1.5, ok_rows=3,
    ...                    error_rows=1)
    >>> s = acc.snapshot()
    >>> s.rows_done, s.rows_failed, s.in_flight, s.p50_latency_s
    (4, 1, 0, 1.5)

    The pool's way: it keeps its calls in flight where the accumulator reads them, and tells
    each call's end from its fields:

    >>> live = LiveCalls()
    >>> acc.watch(live)
    >>> live.calls[1] = (2.0, 1, 40)  # batch 1's call started at t=2 on agent 1 (40 tokens)
    >>> s = acc.snapshot(now=2.5)
    >>> s.in_flight, s.calls, s.agents[1].inflight_tokens, s.oldest_in_flight_s
    (1, 2, 40, 0.5)
    >>> del live.calls[1]
    >>> live.answered.append((3.0, 1, 1, 4, 40, 1.0, 0, NOTHING_USED))  # its answer (4 rows)
    >>> s = acc.snapshot()
    >>> s.in_flight, s.calls, s.rows_done, s.elapsed_s
    (0, 2, 8, 3.0)
    """

    def _clock(self, t: float) -> None:
        if self.t0 is None:
            self.t0 = t
        if t > self.t_last:
            self.t_last = t

    # -- a batch's calls, from their fields (the pool's hot path) ------------------------------
    def batch_started(self, t: float, batch_id: int, agent_id: int, tokens: int) -> None:
        """A call of batch ``batch_id`` began on agent ``agent_id`` (``BatchStarted``)."""
        if self.pending:
            self.drain()
        if t > self.t_last:
            self.t_last = t
        if self.t0 is None:
            self.t0 = t
        try:
            a = self.agents[agent_id]
        except IndexError:
            a = self._agent(agent_id)
        a.in_flight += 1
        a.inflight_tokens += tokens
        self.calls += 1
        open_calls = self.open_calls
        if batch_id in open_calls:  # (not from the pool: events folded from elsewhere)
            self.more_calls.setdefault(batch_id, []).append(t)
        else:
            open_calls[batch_id] = t

    def batch_finished(self, t: float, batch_id: int, agent_id: int, planned_agent: int,
                       rows: int, tokens: int, elapsed_s: float, ok_rows: int, error_rows: int,
                       input_tokens: int = 0, output_tokens: int = 0) -> None:
        """A call returned outputs for every row (``BatchFinished``)."""
        if self.pending:
            self.drain()
        self._end_call(t, batch_id, agent_id, tokens)
        if self.t0 is None:
            self.t0 = t
        used = Tokens(input_tokens, output_tokens) if input_tokens or output_tokens \
            else NOTHING_USED
        self._fold_each(((t, agent_id, planned_agent, rows, tokens, elapsed_s, error_rows,
                          used),))
        self.calls -= 1  # (counted at its start: _fold_each counts an answered call)
        self.rows_ok_extra += ok_rows - (rows - error_rows)  # (an event's own count of ok rows)

    def watch(self, live: LiveCalls) -> None:
        """Read a pool's calls (in flight, and how many it began) at every snapshot; the pool
        tells each call's end: it appends its answers to ``live.answered`` (which is this
        accumulator's ``pending``), and calls ``call_failed`` / ``call_retried``. A watched
        call is counted as it ends (or at ``RunFinished``, if it never does)."""
        live.answered = self.pending
        self.live.append(live)

    def call_answered(self, t: float, agent_id: int, planned_agent: int, rows: int,
                      tokens: int, elapsed_s: float, error_rows: int, input_tokens: int = 0,
                      output_tokens: int = 0) -> None:
        """A watched call returned outputs for every row (``BatchFinished``'s fields); folded
        later, in order (``pending``)."""
        used = Tokens(input_tokens, output_tokens) if input_tokens or output_tokens \
            else NOTHING_USED
        self.pending.append((t, agent_id, planned_agent, rows, tokens, elapsed_s, error_rows,
                             used))
        if len(self.pending) >= PENDING:
            self.drain()

    def drain(self) -> None:
        """Fold the answered calls in ``pending``, in order (as they came, one at a time)."""
        pending = self.pending
        if not pending:
            return
        items = pending[:]
        pending.clear()  # (the same list: the pools append to it)
        self._fold_each(items)

    def _fold_each(self, items: list[Answer] | tuple[Answer, ...]) -> None:
        """Fold answered calls, one at a time."""
        agents, latency = self.agents, self.latencies.append
        failed, stats, sample_at = 0, self.stats, self._sample_at
        if self.t0 is None:
            self.t0 = items[0][0]
        # (in time order: the pool appends them as they end; an event's comes alone)
        self.t_last = max(self.t_last, items[-1][0])
        self.calls += len(items)
        for t, agent_id, planned_agent, rows, tokens, elapsed_s, error_rows, used in items:
            try:
                a = agents[agent_id]
            except IndexError:
                a = self._agent(agent_id)
            a.done_rows += rows
            a.done_tokens += tokens
            a.done_batches += 1
            if agent_id != planned_agent:
                a.stolen += 1
                a.stolen_tokens += tokens
            a.busy_s += elapsed_s
            a.latency_n += 1
            a.latency_sum += elapsed_s  # (the run's mean latency: the agents' sums)
            latency(elapsed_s)
            if error_rows:
                failed += error_rows
            if used is not NOTHING_USED and (used.input_tokens or used.output_tokens):
                stats["input_tokens"] += used.input_tokens
                stats["output_tokens"] += used.output_tokens
            if t >= sample_at:
                self._sample(t)
                sample_at = self._sample_at
        self.rows_failed += failed

    def batch_failed(self, t: float, batch_id: int, agent_id: int, rows: int, tokens: int,
                     elapsed_s: float, *, bisected: bool = False) -> None:
        """A batch ended in error (``BatchFailed``); ``bisected``: its rows go on in halves."""
        if self.pending:
            self.drain()
        self._end_call(t, batch_id, agent_id, tokens)
        self.call_failed(t, agent_id, rows, tokens, elapsed_s, bisected=bisected, called=False)

    def call_failed(self, t: float, agent_id: int, rows: int, tokens: int, elapsed_s: float,
                    *, bisected: bool = False, called: bool = True) -> None:
        """A watched call ended the batch in error (``BatchFailed``'s fields); ``called``:
        false when the batch was failed without a call (too big to send)."""
        if self.pending:
            self.drain()
        self._clock(t)
        a = self._agent(agent_id)
        self.calls += called
        a.errors += 1
        a.busy_s += elapsed_s
        self.stats["errors"] += 1
        assert self.t0 is not None
        self.incidents.append((t - self.t0, "error"))
        if not bisected:
            a.done_rows += rows
            a.done_tokens += tokens
            a.done_batches += 1
            self.rows_failed += rows
            self._sample(t)

    def call_retried(self, ev: BatchRetried) -> None:
        """A watched call failed and its batch is tried again (``BatchRetried``)."""
        if self.pending:
            self.drain()
        self._clock(ev.t)
        self.calls += 1
        self._retried(self._agent(ev.agent_id), ev)

    def _retried(self, a: AgentCounts, ev: BatchRetried) -> None:
        s = self.stats
        a.retries += 1
        s["retries"] += 1
        s["rate_limited"] += ev.rate_limited
        assert self.t0 is not None
        self.incidents.append((ev.t - self.t0, "429" if ev.rate_limited else "retry"))

    def _end_call(self, t: float, batch_id: int, agent_id: int, tokens: int) -> AgentCounts:
        if t > self.t_last:
            self.t_last = t
        if self.t0 is None:
            self.t0 = t
        a = self.agents[agent_id] if agent_id < len(self.agents) else self._agent(agent_id)
        a.in_flight -= 1
        a.inflight_tokens -= tokens
        if self.more_calls and batch_id in self.more_calls:
            self._end_more(batch_id)
        else:
            self.open_calls.pop(batch_id, None)
        return a

    def _end_more(self, batch_id: int) -> None:
        """One of several calls of ``batch_id`` ended: the oldest (its start goes)."""
        more = self.more_calls[batch_id]
        self.open_calls[batch_id] = more.pop(0)
        if not more:
            del self.more_calls[batch_id]

    # -- any event -------------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Fold one event."""
        if self.pending:
            self.drain()
        if isinstance(ev, BatchStarted):
            self.batch_started(ev.t, ev.batch_id, ev.agent_id, ev.tokens)
        elif isinstance(ev, BatchFinished):
            self.batch_finished(ev.t, ev.batch_id, ev.agent_id, ev.planned_agent, ev.rows,
                                ev.tokens, ev.elapsed_s, ev.ok_rows, ev.error_rows,
                                ev.input_tokens, ev.output_tokens)
        elif isinstance(ev, BatchFailed):
            self.batch_failed(ev.t, ev.batch_id, ev.agent_id, ev.rows, ev.tokens, ev.elapsed_s,
                              bisected=ev.bisected)
        else:
            self._clock(ev.t)
            self._apply_other(ev)

    def _apply_other(self, ev: Event) -> None:
        s = self.stats
        if isinstance(ev, RunStarted):
            self.t0 = ev.t
            s["total_rows"] += ev.total_rows
            s["total_batches"] += ev.total_batches
            s["total_tokens"] += ev.total_tokens
            s["cached_rows"] += ev.cached_rows
            s["rows_before"] += ev.rows_before
            self.rpm, self.tpm = ev.rpm, ev.tpm
            for i, tok in enumerate(ev.planned_tokens):
                self._agent(i).planned_tokens += tok
            self.finished = False
            self._sample_at = float("-inf")
        elif isinstance(ev, BatchRetried):
            self._retried(self._end_call(ev.t, ev.batch_id, ev.agent_id, ev.tokens), ev)
        elif isinstance(ev, BatchHedged):
            s["hedges"] += 1
            self.calls += 1
        elif isinstance(ev, JobUpdated):
            self.jobs[ev.job] = ev
        elif isinstance(ev, RunFinished):
            self.finished = True
            self.cancelled = ev.cancelled
            if ev.cancelled:  # calls still open were cancelled: none is in flight any more
                s["rows_cancelled"] = max(0, s["total_rows"] - self._sum("done_rows"))
            for a in self.agents:
                a.in_flight, a.inflight_tokens = 0, 0
            self.open_calls.clear()
            self.more_calls.clear()
            self.calls += sum(len(live.calls) for live in self.live)  # (open: cancelled)
            self.live = []
            self._sample(ev.t, force=True)

    def counts(self) -> dict[str, int]:
        """RunStats' int fields as they stand."""
        self.drain()
        return self.folded_counts()

    def _sample(self, t: float, *, force: bool = False) -> None:
        assert self.t0 is not None
        rel = t - self.t0
        if force or not self.history or rel - self.history[-1][0] >= self._history_step:
            self.history.append((rel, self._sum("done_rows"), self._sum("done_tokens")))
            if len(self.history) > self.max_history:  # a long run: thin out, keep the ends
                self.history = [self.history[0], *self.history[-1:0:-2][::-1]]
                self._history_step *= 2
        # a finished batch before this time takes no sample: it skips the call
        self._sample_at = self.t0 + self.history[-1][0] + self._history_step


    def snapshot(self, now: float | None = None) -> RunStats:
        """Freeze the current state. ``now`` (monotonic) sets elapsed time while running."""
        self.drain()
        return self.freeze(now)


def fold(events: Iterable[Event], now: float | None = None) -> RunStats:
    """Pure fold: the RunStats that a sequence of events leads to."""
    acc = StatsAccumulator()
    for ev in events:
        acc.apply(ev)
    return acc.snapshot(now)
