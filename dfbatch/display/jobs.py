"""The jobs of a Batch API run (``chat(..., api="batch")``) in the live views: a compact
summary for the terminal bar, one line per job when it closes, and a table for the notebook
dashboard. Everything comes from ``RunStats.jobs`` (the ``JobUpdated`` events).

Examples
--------
>>> from dfbatch.events import RunStats
>>> from dfbatch.job_events import JobUpdated
>>> from dfbatch.display.jobs import job_lines, jobs_summary
>>> jobs = (JobUpdated(0.0, 0, "batch_1", "completed", 100, 98, 2, None, 0.0125),
...         JobUpdated(0.0, 1, "batch_2", "in_progress", 100, 40, 0, 90.0))
>>> s = RunStats(total_batches=3, jobs=jobs)
>>> jobs_summary(s)
'jobs: 1 completed, 1 in_progress (40/100 requests), 1 waiting; saved $0.0125'
>>> print("\\n".join(job_lines(s)))
batch_1  completed     98 ok / 2 failed of 100  saved $0.0125
batch_2  in_progress   40 ok / 0 failed of 100  ETA 1:30
"""

from __future__ import annotations

import html
from collections import Counter

from dfbatch.display import fmt_duration
from dfbatch.display.style import COLORS
from dfbatch.events import RunStats
from dfbatch.job_events import FINAL, JobUpdated

_COLOUR = {"completed": COLORS["ok"], "failed": COLORS["failed"], "expired": COLORS["retried"],
           "cancelled": COLORS["failed"], "cancelling": COLORS["retried"]}


def waiting(stats: RunStats) -> int:
    """Files of the run not submitted yet (waiting for room under the enqueued-token limit)."""
    return max(0, stats.total_batches - len(stats.jobs))


def jobs_summary(stats: RunStats) -> str:
    """One line: jobs per status, requests done of the jobs in flight, waiting files, saved."""
    if not stats.jobs:
        return ""
    counts = Counter(j.status for j in stats.jobs)
    parts = []
    for status, n in counts.items():
        part = f"{n} {status}"
        if status not in FINAL:
            of = [j for j in stats.jobs if j.status == status]
            if any(j.done for j in of):
                part += f" ({sum(j.done for j in of):,}/{sum(j.rows for j in of):,} requests)"
        parts.append(part)
    if waiting(stats):
        parts.append(f"{waiting(stats)} waiting")
    text = "jobs: " + ", ".join(parts)
    saved = stats.saved_usd
    return text + (f"; saved ${saved:.4f}" if saved is not None else "")


def job_lines(stats: RunStats) -> list[str]:
    """One line per job: id, status, the provider's counts, and its ETA or what it saved."""
    width = max((len(j.job_id) for j in stats.jobs), default=0)
    return [f"{j.job_id:<{width}}  {j.status:<12}  {_counts(j)}  {_tail(j)}".rstrip()
            for j in stats.jobs]


def jobs_html(stats: RunStats) -> str:
    """The jobs table of the notebook dashboard ('' when the run has no jobs)."""
    if not stats.jobs:
        return ""
    rows = []
    for j in stats.jobs:
        colour = _COLOUR.get(j.status, COLORS["done"])
        share = j.done / j.rows if j.rows else 0.0
        bar = (f'<div style="background:#e6e9ee;width:120px;height:8px;border-radius:2px">'
               f'<div style="background:{colour};width:{120 * share:.0f}px;height:8px;'
               f'border-radius:2px"></div></div>')
        cells = (html.escape(j.job_id), f'<span style="color:{colour};font-weight:600">'
                 f"{html.escape(j.status)}</span>", bar, html.escape(_counts(j)),
                 html.escape(_tail(j)))
        rows.append("<tr>" + "".join(f'<td style="padding:0 10px 0 0">{c}</td>' for c in cells)
                    + "</tr>")
    foot = jobs_summary(stats)
    return ('<div style="font-size:12px;line-height:1.5;padding:0 0 4px 2px">'
            f'<table style="border-collapse:collapse">{"".join(rows)}</table>'
            f'<span style="opacity:.7">{html.escape(foot)}</span></div>')


def _counts(j: JobUpdated) -> str:
    return f"{j.completed:,} ok / {j.failed:,} failed of {j.rows:,}"


def _tail(j: JobUpdated) -> str:
    if j.saved_usd is not None:
        return f"saved ${j.saved_usd:.4f}"
    if j.eta_s is not None and j.status not in FINAL:
        return f"ETA {fmt_duration(j.eta_s)}"
    return ""
