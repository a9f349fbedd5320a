"""The ``df.batch`` / ``lf.batch`` accessor: thin methods that forward to the typed functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dfbatch.plan import PlanSummary


@pl.api.register_dataframe_namespace("batch")
class BatchFrame:
    """``df.batch``: plan, process and inspect a DataFrame in batches. See ``dfbatch.process``."""

    def __init__(self, df: pl.DataFrame) -> None:
        self._df = df

    def plan(self, text: str | pl.Expr = "text", **config: Any) -> pl.DataFrame:
        """Add ``n_tokens``, ``batch_id``, ``agent_id`` and ``plan_flag``; see ``dfbatch.plan``."""
        from dfbatch.plan import plan

        return plan(self._df, text, **config)

    def summary(self, **kwargs: Any) -> PlanSummary:
        """Summarize a planned frame; see ``dfbatch.summary``."""
        from dfbatch.plan import summary

        return summary(self._df, **kwargs)

    def process(self, fn: Any, text: str | pl.Expr = "text", **config: Any) -> pl.DataFrame:
        """Run ``fn`` over the frame in batches (blocking); see ``dfbatch.process``."""
        from dfbatch.run._process import process

        return process(self._df, fn, text, **config)

    async def aprocess(self, fn: Any, text: str | pl.Expr = "text", **config: Any) -> pl.DataFrame:
        """``await``-able ``process``; see ``dfbatch.aprocess``."""
        from dfbatch.run._process import aprocess

        return await aprocess(self._df, fn, text, **config)

    def batches(self) -> pl.DataFrame:
        """One row per batch that ran, from a result frame (``execute._result.batches``)."""
        from dfbatch.execute._result import batches

        return batches(self._df)

    def agents(self) -> pl.DataFrame:
        """One row per agent, from a result frame; see ``dfbatch.execute._result.agents``."""
        from dfbatch.execute._result import agents

        return agents(self._df)

    def plot_timeline(self, **kwargs: Any) -> Figure:
        """Gantt chart of batches per agent, from a result frame."""
        from dfbatch.display.plots import plot_timeline

        return plot_timeline(self._df, **kwargs)

    def plot_agent_load(self, **kwargs: Any) -> Figure:
        """Per-agent tokens, rows, busy time and errors, from a result frame."""
        from dfbatch.display.plots import plot_agent_load

        return plot_agent_load(self._df, **kwargs)


@pl.api.register_lazyframe_namespace("batch")
class BatchLazyFrame:
    """``lf.batch``: plan lazily, or process a larger-than-memory input in chunks."""

    def __init__(self, lf: pl.LazyFrame) -> None:
        self._lf = lf

    def plan(self, text: str | pl.Expr = "text", **config: Any) -> pl.LazyFrame:
        """Lazy ``plan``: returns a LazyFrame; see ``dfbatch.plan``."""
        from dfbatch.plan import plan

        return plan(self._lf, text, **config)

    def process(self, fn: Any, text: str | pl.Expr = "text", **config: Any) -> pl.DataFrame:
        """Process a LazyFrame; see ``dfbatch.process``."""
        from dfbatch.run._process import process

        return process(self._lf, fn, text, **config)
