"""The ``df.batch`` / ``lf.batch`` accessor: thin methods that forward to the typed functions.

``process`` / ``aprocess`` take exactly the parameters of ``dfbatch.process`` after the frame
(``_after_frame`` hands them over, so IDEs and ``help()`` show them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import polars as pl

from dfbatch.errors import ConfigError
from dfbatch.run._process import aprocess as _aprocess
from dfbatch.run._process import process as _process

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dfbatch.plan import PlanSummary

P = ParamSpec("P")
T = TypeVar("T")


def _after_frame(
    like: Callable[Concatenate[Any, P], T],
) -> Callable[[Callable[..., T]], Callable[Concatenate[Any, P], T]]:
    """Give a namespace method the parameters of ``like`` after its first (the frame)."""

    def decorate(method: Callable[..., T]) -> Callable[Concatenate[Any, P], T]:
        sig = inspect.signature(like)
        this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        params = [this, *list(sig.parameters.values())[1:]]
        method.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return method

    return decorate


@pl.api.register_dataframe_namespace("batch")
class BatchFrame:
    """``df.batch``: plan, process and inspect a DataFrame in batches. See ``dfbatch.process``."""

    def __init__(self, df: pl.DataFrame) -> None:
        self._df = df

    def plan(self, text: str | pl.Expr = "text", **config: Any) -> pl.DataFrame:
        """Add ``n_tokens``, ``batch_id``, ``agent_id`` and ``plan_flag``; see ``dfbatch.plan``."""
        from dfbatch.plan import plan

        return plan(self._df, text, **config)

    def summary(self, *, fn: Callable[..., Any] | None = None, cache: Any = None,
                cache_key: list[str] | None = None, cache_errors: bool = False,
                text: str | pl.Expr = "text", **kwargs: Any) -> PlanSummary:
        """Summarize a planned frame; see ``dfbatch.summary``. With ``fn=`` and ``cache=``
        (``cache_key=`` and ``cache_errors=`` as in ``process``) the rows the run would take
        from the cache are counted apart and not priced."""
        from dfbatch.plan import summary

        if cache is None or cache is False:
            if cache_key is not None or cache_errors:
                msg = "cache_key / cache_errors only apply with cache=; pass cache=True too"
                raise ConfigError(msg)
        else:
            from dfbatch.persist._cache_run import cached_rows
            from dfbatch.run._prepare import sent_frame

            if fn is None:
                msg = "summary(cache=...) needs fn= (the fn the run will call)"
                raise ConfigError(msg)
            settings = {k: v for k, v in kwargs.items() if k not in (
                "config", "price_in_per_1k", "price_out_per_1k", "batch_discount")}
            sent, cfg = sent_frame(self._df, fn, text, kwargs.get("config"), settings)
            kwargs["cached"] = cached_rows(sent, fn, text, cfg, cache, cache_key,
                                           cache_errors=cache_errors)
        return summary(self._df, fn=fn, **kwargs)

    @_after_frame(_process)
    def process(self, *args: Any, **kwargs: Any) -> pl.DataFrame:
        """Run ``fn`` over the frame in batches (blocking); see ``dfbatch.process``."""
        return _process(self._df, *args, **kwargs)

    @_after_frame(_aprocess)
    async def aprocess(self, *args: Any, **kwargs: Any) -> pl.DataFrame:
        """``await``-able ``process``; see ``dfbatch.aprocess``."""
        return await _aprocess(self._df, *args, **kwargs)

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

    @_after_frame(_process)
    def process(self, *args: Any, **kwargs: Any) -> pl.DataFrame:
        """Process a LazyFrame (``out=``: in chunks, to Parquet); see ``dfbatch.process``."""
        return _process(self._lf, *args, **kwargs)
