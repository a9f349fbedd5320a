"""What a Batch API run tells about its jobs while it waits for them.

``JobView`` turns each state of a job the provider reports (status, request counts) into a
``JobUpdated`` event, with an ETA from the pace of those counts and, once the job's answers
are collected, the cost they saved against synchronous calls (the adapter's model price and
``BatchLimits.discount``). Events feed ``on_event`` and the live view (the dashboard's jobs
table, the terminal bar's postfix); without a live view, one line per change goes to stderr.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from dfbatch.events import Event
from dfbatch.job_events import JobUpdated


class JobView:
    """Events (and stderr lines when ``lines``) for the jobs of one run."""

    def __init__(self, emit: Callable[[Event], None], *, lines: bool,
                 price: tuple[float, float] | None, discount: float) -> None:
        self.emit = emit
        self.lines = lines
        self.price = price
        self.discount = discount
        self._shown: dict[int, JobUpdated] = {}

    def show(self, job: int, entry: Any, batch: Any) -> None:
        """The provider's latest view of job ``job`` (``entry``: its journal entry)."""
        counts = batch.request_counts
        entry.counts = {"total": counts.total, "completed": counts.completed,
                        "failed": counts.failed} if counts is not None else {}
        eta = eta_s(entry.counts, getattr(batch, "in_progress_at", None) or entry.created_at,
                    time.time()) if batch.status == "in_progress" else None
        self._update(JobUpdated(
            asyncio.get_running_loop().time(), job, str(batch.id), str(batch.status),
            len(entry.rows), int(entry.counts.get("completed", 0)),
            int(entry.counts.get("failed", 0)), eta), entry.name)

    def collected(self, job: int, input_tokens: int, output_tokens: int) -> None:
        """Job ``job``'s answers are in, and what they saved against synchronous calls."""
        last = self._shown.get(job)
        if last is None:
            return
        saved = None
        if self.price is not None:
            full = (input_tokens * self.price[0] + output_tokens * self.price[1]) / 1000
            saved = full * (1 - self.discount)
        self._update(JobUpdated(asyncio.get_running_loop().time(), job, last.job_id,
                                last.status, last.rows, last.completed, last.failed, None,
                                saved, collected=True), None)

    def _update(self, ev: JobUpdated, name: str | None) -> None:
        last = self._shown.get(ev.job)
        same = last is not None and (last.status, last.done, last.collected) == (
            ev.status, ev.done, ev.collected)
        self._shown[ev.job] = ev
        if same:
            return
        self.emit(ev)
        if self.lines and name is not None:
            line = (f"dfbatch: batch job {ev.job_id} ({name}, {ev.rows:,} rows): "
                    f"{ev.status} {ev.completed:,} done, {ev.failed:,} failed")
            if ev.eta_s is not None:
                line += f", about {duration(ev.eta_s)} left"
            print(line, file=sys.stderr)


def eta_s(counts: dict[str, int], since: float | None, now: float) -> float | None:
    """Seconds left for a job at the pace its request counts show since ``since``.

    >>> eta_s({"total": 100, "completed": 20, "failed": 5}, since=1000.0, now=1050.0)
    150.0
    >>> eta_s({"total": 100, "completed": 0, "failed": 0}, since=1000.0, now=1050.0) is None
    True
    """
    done = counts.get("completed", 0) + counts.get("failed", 0)
    total = counts.get("total", 0)
    if since is None or done <= 0 or now <= since or total <= done:
        return None
    return (now - since) / done * (total - done)


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
