"""What happened to a run: one frozen event per state change of a batch.

The pool emits them; ``dfbatch.events`` folds them into ``RunStats`` (``_fold``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dfbatch.job_events import JobUpdated


@dataclass(frozen=True, slots=True)
class RunStarted:
    t: float
    total_rows: int
    total_batches: int
    total_tokens: int
    planned_tokens: tuple[int, ...]  # per agent; len() is the number of agents
    cached_rows: int = 0  # rows answered from the response cache (never sent; not in total_rows)
    rows_before: int = 0  # rows a checkpoint already holds (a resumed run skips them)
    rpm: float | None = None  # the run's rate limits: the ETA is never shorter than they allow
    tpm: float | None = None


@dataclass(frozen=True, slots=True)
class _BatchEvent:
    """The fields every batch event starts with (positional order matters: emitters use it)."""

    t: float
    batch_id: int
    agent_id: int


@dataclass(frozen=True, slots=True)
class _BatchCall(_BatchEvent):
    """A call of a batch that counts towards its agent's work: started, finished or failed."""

    planned_agent: int
    rows: int
    tokens: int


@dataclass(frozen=True, slots=True)
class BatchStarted(_BatchCall):
    attempt: int


@dataclass(frozen=True, slots=True)
class BatchRetried(_BatchEvent):
    tokens: int
    attempt: int
    delay_s: float
    error: str
    rate_limited: bool = False


@dataclass(frozen=True, slots=True)
class BatchHedged(_BatchEvent):
    """A straggling call got a duplicate (``hedge_after``); the first answer wins."""


@dataclass(frozen=True, slots=True)
class BatchFinished(_BatchCall):
    """A call returned outputs for every row (some rows may carry their own error values)."""

    elapsed_s: float
    ok_rows: int
    error_rows: int
    input_tokens: int = 0  # usage reported by fn (real tokens), 0 when unknown
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BatchFailed(_BatchCall):
    """A batch ended in error. ``bisected``: its rows go on in two halves (not done yet)."""

    elapsed_s: float
    error: str
    bisected: bool = False


@dataclass(frozen=True, slots=True)
class RunFinished:
    t: float
    cancelled: bool = False


Event = (
    RunStarted | BatchStarted | BatchRetried | BatchHedged | BatchFinished | BatchFailed
    | RunFinished | JobUpdated
)
