"""Run events and the pure fold that turns them into frozen ``RunStats`` snapshots.

The pool emits one event per state change of a batch. Displays (widget, progress bar) never
look inside the pool: they subscribe to events or read ``RunStats`` snapshots.

Examples
--------
>>> from dfbatch.events import RunStarted, BatchStarted, BatchFinished, fold
>>> evs = [
...     RunStarted(t=0.0, total_rows=4, total_batches=1, total_tokens=40, planned_tokens=(40,)),
...     BatchStarted(t=0.0, batch_id=0, agent_id=0, planned_agent=0, rows=4, tokens=40, attempt=1),
...     BatchFinished(t=2.0, batch_id=0, agent_id=0, planned_agent=0, rows=4, tokens=40,
...                   elapsed_s=2.0, ok_rows=4, error_rows=0),
... ]
>>> s = fold(evs)
>>> s.rows_done, s.rows_ok, s.fraction_done, s.agents[0].mean_latency_s
(4, 4, 1.0, 2.0)
"""

from __future__ import annotations

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
from dfbatch.events._fold import StatsAccumulator, fold
from dfbatch.events._live import LiveCalls
from dfbatch.events._stats import AgentStats, RunStats

__all__ = [
    "AgentStats",
    "BatchFailed",
    "BatchFinished",
    "BatchHedged",
    "BatchRetried",
    "BatchStarted",
    "Event",
    "LiveCalls",
    "RunFinished",
    "RunStarted",
    "RunStats",
    "StatsAccumulator",
    "fold",
]
