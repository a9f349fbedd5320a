"""A run's running counts (what ``StatsAccumulator`` folds events into) and the frozen
``RunStats`` they stand for.

The fold (``events._fold``) bumps these counts O(1) per call; what several of them add up to
(rows done, calls in flight: the agents' sums), percentiles, the oldest call in flight and the
calls a pool keeps in flight itself (``LiveCalls``) are computed here, by ``freeze``, at the
display's frame rate.

``RunStats``' int fields are counted by name (its annotations are strings under
``from __future__ import annotations``, so ``field.type == "int"`` picks them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dfbatch.events._live import Answer, LiveCalls
from dfbatch.events._stats import AgentStats, RunStats
from dfbatch.job_events import JobUpdated

_RUN_INTS = tuple(k for k, f in RunStats.__dataclass_fields__.items() if f.type == "int")
# AgentStats' fields that AgentCounts counts (all but its id and mean latency)
_AGENT_COUNTS = tuple(k for k in AgentStats.__dataclass_fields__
                      if k not in ("agent_id", "mean_latency_s"))
# RunStats' counts that are the sums of the agents' (kept once, per agent)
_SUMMED = (("in_flight", "in_flight"), ("rows_done", "done_rows"),
           ("batches_done", "done_batches"), ("tokens_done", "done_tokens"))
_HOT = ("calls", "rows_failed")  # bumped once a batch: RunCounts' slots


@dataclass(slots=True)
class AgentCounts:
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
class RunCounts:
    """What the fold keeps of a run, and ``freeze``: the ``RunStats`` it stands for (the
    answered calls not folded yet, ``pending``, left out: ``StatsAccumulator`` folds them
    first)."""

    history_every_s: float = 0.2
    max_history: int = 2_000  # then every other point goes and the spacing doubles
    max_incidents: int = 2_000
    latency_window: int = 2_000
    t0: float | None = None
    t_last: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)  # RunStats' counts seldom bumped
    agents: list[AgentCounts] = field(default_factory=list)
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

    def _agent(self, i: int) -> AgentCounts:
        while len(self.agents) <= i:
            self.agents.append(AgentCounts())
        return self.agents[i]

    def _mean_latency(self) -> float:
        n = self._sum("latency_n")
        return sum(a.latency_sum for a in self.agents) / n if n else 0.0

    def _sum(self, count: str) -> int:
        return sum(getattr(a, count) for a in self.agents)

    def folded_counts(self) -> dict[str, int]:
        """RunStats' int fields as folded so far (``pending`` left out)."""
        summed = {k: self._sum(mine) for k, mine in _SUMMED}
        rows_ok = summed["rows_done"] - self.rows_failed + self.rows_ok_extra
        return {**self.stats, **{k: getattr(self, k) for k in _HOT}, "rows_ok": rows_ok,
                **summed}

    def freeze(self, now: float | None = None) -> RunStats:
        """The counts folded so far, and the pools' calls in flight, as ``RunStats``; ``now``
        (monotonic) sets elapsed time while running."""
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
        counts = self.folded_counts()
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

