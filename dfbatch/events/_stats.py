"""Frozen snapshots of a run (``RunStats``, one ``AgentStats`` an agent): all a display reads."""

from __future__ import annotations

from dataclasses import dataclass

from dfbatch.job_events import JobUpdated, answering, jobs_eta, saved_usd


@dataclass(frozen=True, slots=True)
class AgentStats:
    agent_id: int
    planned_tokens: int = 0
    done_tokens: int = 0
    inflight_tokens: int = 0
    in_flight: int = 0
    done_rows: int = 0
    done_batches: int = 0
    errors: int = 0
    retries: int = 0
    stolen: int = 0  # batches this agent ran that were planned for another agent
    busy_s: float = 0.0
    mean_latency_s: float = 0.0
    stolen_tokens: int = 0  # tokens of those stolen batches (part of done_tokens)


@dataclass(frozen=True, slots=True)
class RunStats:
    """A frozen snapshot of a run. Every display renders from this alone."""

    total_rows: int = 0
    total_batches: int = 0
    total_tokens: int = 0
    rows_done: int = 0
    cached_rows: int = 0  # answered from the response cache: no call, not in total_rows
    rows_ok: int = 0
    rows_failed: int = 0
    batches_done: int = 0
    calls: int = 0
    in_flight: int = 0
    retries: int = 0
    rate_limited: int = 0
    errors: int = 0  # batch-level failures (calls that raised and were not retried)
    hedges: int = 0
    tokens_done: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0
    mean_latency_s: float = 0.0
    p50_latency_s: float = 0.0
    p95_latency_s: float = 0.0
    finished: bool = False
    cancelled: bool = False
    agents: tuple[AgentStats, ...] = ()
    # (seconds since start, rows done, tokens done), sampled at most every 0.2 s
    history: tuple[tuple[float, int, int], ...] = ()
    # (seconds since start, "retry" | "429" | "error")
    incidents: tuple[tuple[float, str], ...] = ()
    rows_before: int = 0  # done by an earlier run (resumed from a checkpoint); not in rows_done
    oldest_in_flight_s: float = 0.0  # age of the oldest call in flight (0 when none)
    rows_cancelled: int = 0  # rows a stopped run left unfinished
    rpm: float | None = None
    tpm: float | None = None
    jobs: tuple[JobUpdated, ...] = ()  # a Batch API run's jobs, the latest state of each

    @property
    def saved_usd(self) -> float | None:
        """What a Batch API run's collected jobs cost less than synchronous calls."""
        return saved_usd(self.jobs)

    @property
    def rows_shown(self) -> int:
        """Rows done counting a resumed run's earlier rows (and the requests provider jobs
        did before their answers are collected): what a progress bar shows."""
        return self.rows_before + self.rows_done + answering(self.jobs)

    @property
    def total_shown(self) -> int:
        """All rows of the frame, a resumed run's earlier rows included."""
        return self.rows_before + self.total_rows

    @property
    def fraction_done(self) -> float:
        total = self.total_shown
        return self.rows_shown / total if total else 1.0

    @property
    def percent_done(self) -> int:
        """Whole percent done, rounded down: 100 only once every row is done."""
        return int(100 * self.fraction_done) if self.total_shown else 100

    @property
    def rows_per_s(self) -> float:
        return self.rows_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current row rate, None before the first row finishes."""
        rate = self.rows_per_s
        if self.finished:
            return 0.0
        if self.jobs:  # provider jobs: their request counts tell (not of files still waiting)
            return jobs_eta(self.jobs) if len(self.jobs) >= self.total_batches else None
        if rate <= 0:
            return None
        eta = (self.total_rows - self.rows_done) / rate
        if self.tpm:  # what is left cannot go faster than the token limit allows
            eta = max(eta, 60.0 * max(0, self.total_tokens - self.tokens_done) / self.tpm)
        if self.rpm:
            eta = max(eta, 60.0 * max(0, self.total_batches - self.batches_done) / self.rpm)
        return eta
