"""The event of a provider Batch API job (``chat(..., api="batch")``), and the overall ETA.

A Batch API run (``dfbatch.run._batch_api``) emits one ``JobUpdated`` whenever one of its jobs
changes: waiting for room under the enqueued-token limit, then the provider's status and
request counts, then collected (with the cost it saved against synchronous calls).
``dfbatch.events.StatsAccumulator`` keeps the latest one per job in ``RunStats.jobs``, so the
dashboard and the terminal bar show the jobs from the events alone.

Examples
--------
>>> from dfbatch.job_events import JobUpdated, jobs_eta
>>> a = JobUpdated(t=0.0, job=0, job_id="batch_1", status="in_progress", rows=100,
...                completed=40, eta_s=120.0)
>>> b = JobUpdated(t=0.0, job=1, job_id="batch_2", status="in_progress", rows=100,
...                completed=70, eta_s=45.0)
>>> jobs_eta((a, b)), a.done, a.live
(120.0, 40, True)
>>> jobs_eta((a, JobUpdated(t=0.0, job=2, job_id="", status="waiting", rows=50))) is None
True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class JobUpdated:
    """One job's latest state. ``job``: the run's number for it (its input file);
    ``job_id``: the provider's id (``""`` while ``waiting`` to be submitted); ``status``:
    ``waiting`` or the provider's (``validating``, ``in_progress``, ``finalizing``,
    ``completed``, ``failed``, ``expired``, ``cancelling``, ``cancelled``); ``completed`` /
    ``failed``: the provider's request counts; ``eta_s``: seconds left at the pace those
    counts show (None: unknown); ``saved_usd``: what its answers cost less than synchronous
    calls once its answers are in (None: not yet, or the model has no known price);
    ``collected``: its answers are in (its rows count in ``RunStats.rows_done`` then)."""

    t: float
    job: int
    job_id: str
    status: str
    rows: int
    completed: int = 0
    failed: int = 0
    eta_s: float | None = None
    saved_usd: float | None = None
    collected: bool = False

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def live(self) -> bool:
        """Not over yet (waiting, or at the provider)."""
        return self.status not in FINAL


def jobs_eta(jobs: Iterable[JobUpdated]) -> float | None:
    """Seconds until the last live job is over: the longest of their ETAs; None while one
    is unknown (waiting, validating, nothing done yet); 0 when none is live."""
    etas = [j.eta_s for j in jobs if j.live]
    if any(e is None for e in etas):
        return None
    return max((e for e in etas if e is not None), default=0.0)


def answering(jobs: Iterable[JobUpdated]) -> int:
    """Requests the provider has done in jobs not collected yet (progress before the rows'
    answers are in)."""
    return sum(j.done for j in jobs if not j.collected)


def saved_usd(jobs: Iterable[JobUpdated]) -> float | None:
    """The cost the collected jobs saved, None when no job has a price."""
    known = [j.saved_usd for j in jobs if j.saved_usd is not None]
    return sum(known) if known else None
