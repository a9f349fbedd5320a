"""The fold from events to ``RunStats``: O(1) per event, a frozen snapshot on demand.

``RunStats``' int fields are counted by name (its annotations are strings under
``from __future__ import annotations``, so ``field.type == "int"`` picks them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
from dfbatch.events._stats import AgentStats, RunStats
from dfbatch.job_events import JobUpdated

# An agent's running counts: AgentStats' fields but its id and mean latency, plus latency_n.
_AGENT_COUNTS = tuple(
    (k, f.default) for k, f in AgentStats.__dataclass_fields__.items()
    if k not in ("agent_id", "mean_latency_s")
)
_Agent = dict[str, Any]


def _new_agent() -> _Agent:
    return {**dict(_AGENT_COUNTS), "latency_n": 0}


def _freeze(agent_id: int, a: _Agent) -> AgentStats:
    counts = {k: a[k] for k, _ in _AGENT_COUNTS}
    mean = a["busy_s"] / a["latency_n"] if a["latency_n"] else 0.0
    return AgentStats(agent_id=agent_id, mean_latency_s=mean, **counts)


@dataclass
class StatsAccumulator:
    """Folds events one at a time (O(1) each); ``snapshot()`` freezes the state into RunStats."""

    history_every_s: float = 0.2
    max_history: int = 2_000  # then every other point goes and the spacing doubles
    max_incidents: int = 2_000
    latency_window: int = 2_000
    t0: float | None = None
    t_last: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    agents: list[_Agent] = field(default_factory=list)
    history: list[tuple[float, int, int]] = field(default_factory=list)
    incidents: deque[tuple[float, str]] = field(default_factory=deque)
    latencies: deque[float] = field(default_factory=deque)
    latency_sum: float = 0.0
    latency_n: int = 0
    finished: bool = False
    cancelled: bool = False
    open_calls: dict[int, list[float]] = field(default_factory=dict)  # batch_id -> starts
    rpm: float | None = None
    tpm: float | None = None
    jobs: dict[int, JobUpdated] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = RunStats.__dataclass_fields__
        ints = [k for k, f in keys.items() if f.type == "int"]
        self.stats = dict.fromkeys(ints, 0)
        self.incidents = deque(maxlen=self.max_incidents)
        self.latencies = deque(maxlen=self.latency_window)
        self._history_step = self.history_every_s

    def _agent(self, i: int) -> _Agent:
        while len(self.agents) <= i:
            self.agents.append(_new_agent())
        return self.agents[i]

    def apply(self, ev: Event) -> None:
        s = self.stats
        if self.t0 is None:
            self.t0 = ev.t
        self.t_last = max(self.t_last, ev.t)
        if isinstance(ev, RunStarted):
            self.t0 = ev.t
            s["total_rows"] += ev.total_rows
            s["total_batches"] += ev.total_batches
            s["total_tokens"] += ev.total_tokens
            s["cached_rows"] += ev.cached_rows
            s["rows_before"] += ev.rows_before
            self.rpm, self.tpm = ev.rpm, ev.tpm
            for i, tok in enumerate(ev.planned_tokens):
                self._agent(i)["planned_tokens"] += tok
            self.finished = False
        elif isinstance(ev, BatchStarted):
            a = self._agent(ev.agent_id)
            a["in_flight"] += 1
            a["inflight_tokens"] += ev.tokens
            s["in_flight"] += 1
            s["calls"] += 1
            self.open_calls.setdefault(ev.batch_id, []).append(ev.t)
        elif isinstance(ev, BatchRetried):
            self._end_call(ev.agent_id, ev)
            self._agent(ev.agent_id)["retries"] += 1
            s["retries"] += 1
            s["rate_limited"] += ev.rate_limited
            self.incidents.append((ev.t - self.t0, "429" if ev.rate_limited else "retry"))
        elif isinstance(ev, BatchHedged):
            s["hedges"] += 1
            s["calls"] += 1
        elif isinstance(ev, BatchFinished):
            a = self._end_call(ev.agent_id, ev)
            a["done_rows"] += ev.rows
            a["done_tokens"] += ev.tokens
            a["done_batches"] += 1
            if ev.agent_id != ev.planned_agent:
                a["stolen"] += 1
                a["stolen_tokens"] += ev.tokens
            a["busy_s"] += ev.elapsed_s
            a["latency_n"] += 1
            self._latency(ev.elapsed_s)
            s["rows_done"] += ev.rows
            s["rows_ok"] += ev.ok_rows
            s["rows_failed"] += ev.error_rows
            s["batches_done"] += 1
            s["tokens_done"] += ev.tokens
            s["input_tokens"] += ev.input_tokens
            s["output_tokens"] += ev.output_tokens
            self._sample(ev.t)
        elif isinstance(ev, BatchFailed):
            a = self._end_call(ev.agent_id, ev)
            a["errors"] += 1
            a["busy_s"] += ev.elapsed_s
            s["errors"] += 1
            self.incidents.append((ev.t - self.t0, "error"))
            if not ev.bisected:
                a["done_rows"] += ev.rows
                a["done_tokens"] += ev.tokens
                a["done_batches"] += 1
                s["rows_done"] += ev.rows
                s["rows_failed"] += ev.rows
                s["batches_done"] += 1
                s["tokens_done"] += ev.tokens
                self._sample(ev.t)
        elif isinstance(ev, JobUpdated):
            self.jobs[ev.job] = ev
        elif isinstance(ev, RunFinished):
            self.finished = True
            self.cancelled = ev.cancelled
            if ev.cancelled:  # calls still open were cancelled: none is in flight any more
                s["rows_cancelled"] = max(0, s["total_rows"] - s["rows_done"])
            s["in_flight"] = 0
            for a in self.agents:
                a["in_flight"], a["inflight_tokens"] = 0, 0
            self.open_calls.clear()
            self._sample(ev.t, force=True)

    def _end_call(self, agent_id: int, ev: BatchRetried | BatchFinished | BatchFailed) -> _Agent:
        a = self._agent(agent_id)
        a["in_flight"] -= 1
        a["inflight_tokens"] -= ev.tokens
        self.stats["in_flight"] -= 1
        starts = self.open_calls.get(ev.batch_id)
        if starts:
            starts.pop(0)
            if not starts:
                del self.open_calls[ev.batch_id]
        return a

    def _latency(self, x: float) -> None:
        self.latency_sum += x
        self.latency_n += 1
        self.latencies.append(x)

    def _sample(self, t: float, *, force: bool = False) -> None:
        assert self.t0 is not None
        rel = t - self.t0
        if force or not self.history or rel - self.history[-1][0] >= self._history_step:
            self.history.append((rel, self.stats["rows_done"], self.stats["tokens_done"]))
            if len(self.history) > self.max_history:  # a long run: thin out, keep the ends
                self.history = [self.history[0], *self.history[-1:0:-2][::-1]]
                self._history_step *= 2

    def snapshot(self, now: float | None = None) -> RunStats:
        """Freeze the current state. ``now`` (monotonic) sets elapsed time while running."""
        t0 = self.t0 if self.t0 is not None else 0.0
        end = self.t_last if (self.finished or now is None) else max(now, self.t_last)
        lat = sorted(self.latencies)
        oldest = min((ts[0] for ts in self.open_calls.values() if ts), default=None)
        return RunStats(
            rpm=self.rpm,
            tpm=self.tpm,
            oldest_in_flight_s=0.0 if oldest is None else max(0.0, end - oldest),
            **self.stats,
            elapsed_s=max(0.0, end - t0),
            mean_latency_s=self.latency_sum / self.latency_n if self.latency_n else 0.0,
            p50_latency_s=_quantile(lat, 0.5),
            p95_latency_s=_quantile(lat, 0.95),
            finished=self.finished,
            cancelled=self.cancelled,
            agents=tuple(_freeze(i, a) for i, a in enumerate(self.agents)),
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
