"""Planning: token counts, packing rows into batches, balancing batches over agents, summary.

Pure Polars and numpy, no I/O and no event loop. ``plan`` adds ``n_tokens``, ``batch_id``,
``agent_id`` and ``plan_flag``; ``summary`` describes a planned frame. ``pack`` and ``balance``
are the two algorithms ``plan`` runs, exposed for tests and benchmarks.
"""

from __future__ import annotations

from dfbatch.plan._balance import balance, balance_ratio
from dfbatch.plan._pack import pack
from dfbatch.plan._plan import plan
from dfbatch.plan._summary import PlanSummary, summary

__all__ = ["PlanSummary", "balance", "balance_ratio", "pack", "plan", "summary"]
