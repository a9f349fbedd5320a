"""The fold from events to ``RunStats``: O(1) per event, a frozen snapshot on demand.

``RunStats``' int fields are counted by name (its annotations are strings under
``from __future__ import annotations``, so ``field.type == "int"`` picks them).

The pool tells a live view of each batch without building an event, and nothing at a call's
start: it keeps its calls in flight in a dict (batch id -> (start, agent, tokens)) that the
accumulator ``watch``es and reads at snapshot time, and appends each answered call's fields to
the accumulator's ``pending`` list (``Answer``: a tuple, no event), which is folded in order,
exactly as one call at a time would be, whenever anything reads or changes the counts
(``snapshot``, ``apply``, a failed or retried call) or every ``PENDING`` calls. Failed and
retried calls are told with ``call_failed`` / ``call_retried``; a watched call is counted as it
ends (so a start costs one dict write and nothing else). ``apply`` folds an event object
(``BatchStarted`` ... from a replay, the Batch API, tests) through ``batch_started`` /
``batch_finished`` / ``batch_failed``, which keep their own count of calls in flight. What
several counters add up to (rows done, calls in flight), percentiles and the oldest call in
flight are computed by ``snapshot``, at the display's frame rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

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
from dfbatch.events._stats import AgentStats, RunStats
from dfbatch.job_events import JobUpdated

_RUN_INTS = tuple(k for k, f in RunStats.__dataclass_fields__.items() if f.type == "int")
# AgentStats' fields that _Agent counts (all but its id and mean latency)
_AGENT_COUNTS = tuple(k for k in AgentStats.__dataclass_fields__
                      if k not in ("agent_id", "mean_latency_s"))
# RunStats' counts that are the sums of the agents' (kept once, per agent)
_SUMMED = (("in_flight", "in_flight"), ("rows_done", "done_rows"),
           ("batches_done", "done_batches"), ("tokens_done", "done_tokens"))
_HOT = ("calls", "rows_failed")  # bumped once a batch: StatsAccumulator's slots


@dataclass(slots=True)
class _Agent:
    """One agent's running counts: ``AgentStats``' fields but its id and mean latency."""

    planned_tokens: int = 0
    done_tokens: int = 0
    inflight_tokens: int = 0
    in_flight: int = 0
    done_rows: int = 0
    done_batches: int = 0
    errors: int = 0
    retries: int = 0
    stolen: int = 0
    busy_s: float = 0.0
    stolen_tokens: int = 0
    latency_n: int = 0  # finished calls: busy_s / latency_n is the mean latency
    latency_sum: float = 0.0  # their seconds (the run's mean latency)

    def freeze(self, agent_id: int, live: tuple[int, int] = (0, 0)) -> AgentStats:
        """``live``: the calls in flight and their tokens that the pool keeps (``watch``)."""
        mean = self.busy_s / self.latency_n if self.latency_n else 0.0
        counts = {k: getattr(self, k) for k in _AGENT_COUNTS}
        counts["in_flight"] += live[0]
        counts["inflight_tokens"] += live[1]
        return AgentStats(agent_id=agent_id, mean_latency_s=mean, **counts)


@dataclass(slots=True)
class StatsAccumulator:
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

    history_every_s: float = 0.2
    max_history: int = 2_000  # then every other point goes and the spacing doubles
    max_incidents: int = 2_000
    latency_window: int = 2_000
    t0: float | None = None
    t_last: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)  # RunStats' counts seldom bumped
    agents: list[_Agent] = field(default_factory=list)
    history: list[tuple[float, int, int]] = field(default_factory=list)
    incidents: deque[tuple[float, str]] = field(default_factory=deque)
    latencies: deque[float] = field(default_factory=deque)
    finished: bool = False
    cancelled: bool = False
    open_calls: dict[int, float] = field(default_factory=dict)  # batch_id -> its call's start
    live: list[LiveCalls] = field(default_factory=list)  # the pools' calls (``watch``)
    pending: list[Answer] = field(default_factory=list)  # answered calls not folded yet
    more_calls: dict[int, list[float]] = field(default_factory=dict)  # more calls of one id
    rpm: float | None = None
    tpm: float | None = None
    jobs: dict[int, JobUpdated] = field(default_factory=dict)
    calls: int = 0  # RunStats' counts bumped on every batch (the rest: stats, or agents' sums)
    rows_ok_extra: int = 0  # rows_ok is the rows done less rows_failed, and these (events')
    rows_failed: int = 0
    _history_step: float = field(init=False, default=0.0)
    _sample_at: float = field(init=False, default=float("-inf"))  # no sample before this time

    def __post_init__(self) -> None:
        not_here = {*_HOT, "rows_ok", *(k for k, _ in _SUMMED)}
        self.stats = dict.fromkeys((k for k in _RUN_INTS if k not in not_here), 0)
        self.incidents = deque(maxlen=self.max_incidents)
        self.latencies = deque(maxlen=self.latency_window)
        self._history_step = self.history_every_s

    def _agent(self, i: int) -> _Agent:
        while len(self.agents) <= i:
            self.agents.append(_Agent())
        return self.agents[i]

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

    def _retried(self, a: _Agent, ev: BatchRetried) -> None:
        s = self.stats
        a.retries += 1
        s["retries"] += 1
        s["rate_limited"] += ev.rate_limited
        assert self.t0 is not None
        self.incidents.append((ev.t - self.t0, "429" if ev.rate_limited else "retry"))

    def _end_call(self, t: float, batch_id: int, agent_id: int, tokens: int) -> _Agent:
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

    def _mean_latency(self) -> float:
        n = self._sum("latency_n")
        return sum(a.latency_sum for a in self.agents) / n if n else 0.0

    def _sum(self, count: str) -> int:
        return sum(getattr(a, count) for a in self.agents)

    def counts(self) -> dict[str, int]:
        """RunStats' int fields as they stand."""
        self.drain()
        summed = {k: self._sum(mine) for k, mine in _SUMMED}
        rows_ok = summed["rows_done"] - self.rows_failed + self.rows_ok_extra
        return {**self.stats, **{k: getattr(self, k) for k in _HOT}, "rows_ok": rows_ok,
                **summed}

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
        oldest = min(self.open_calls.values(), default=None)  # (more_calls: later starts)
        live: dict[int, tuple[int, int]] = {}  # agent -> the pools' calls in flight, tokens
        n_live = 0
        for pool in self.live:
            for start, agent, tokens in pool.calls.values():
                n, tok = live.get(agent, (0, 0))
                live[agent] = (n + 1, tok + tokens)
                n_live += 1
                if start > self.t_last:
                    self.t_last = start
                if oldest is None or start < oldest:
                    oldest = start
        if self.t0 is None and n_live:  # (no RunStarted: the first call's start, as an event's)
            self.t0 = min(start for pool in self.live for start, _, _ in pool.calls.values())
        for agent in live:
            self._agent(agent)
        t0 = self.t0 if self.t0 is not None else 0.0
        end = self.t_last if (self.finished or now is None) else max(now, self.t_last)
        lat = sorted(self.latencies)
        counts = self.counts()
        counts["in_flight"] += n_live
        counts["calls"] += n_live
        return RunStats(
            rpm=self.rpm,
            tpm=self.tpm,
            oldest_in_flight_s=0.0 if oldest is None else max(0.0, end - oldest),
            **counts,
            elapsed_s=max(0.0, end - t0),
            mean_latency_s=self._mean_latency(),
            p50_latency_s=_quantile(lat, 0.5),
            p95_latency_s=_quantile(lat, 0.95),
            finished=self.finished,
            cancelled=self.cancelled,
            agents=tuple(a.freeze(i, live.get(i, (0, 0))) for i, a in enumerate(self.agents)),
            history=tuple(self.history),
            incidents=tuple(self.incidents),
            jobs=tuple(self.jobs[k] for k in sorted(self.jobs)),
        )


def _quantile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def fold(events: Iterable[Event], now: float | None = None) -> RunStats:
    """Pure fold: the RunStats that a sequence of events leads to."""
    acc = StatsAccumulator()
    for ev in events:
        acc.apply(ev)
    return acc.snapshot(now)
