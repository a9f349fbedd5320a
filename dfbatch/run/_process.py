"""``process`` / ``aprocess``: plan (unless planned), run the pool, show progress, build the result.

``aprocess`` carries the one written signature; ``process`` is ``run_sync(aprocess(...))`` with
the same parameters (``same_parameters`` gives them to IDEs, type checkers and ``help()``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import polars as pl

from dfbatch.config import BatchConfig, Progress
from dfbatch.engines import Engine, asyncio_only
from dfbatch.errors import ConfigError
from dfbatch.events import Event
from dfbatch.execute._loop import on_interrupt, run_sync
from dfbatch.persist._cache_run import CacheArg, check_cached_column, open_cache
from dfbatch.persist._checkpoint import Resume, open_journal
from dfbatch.run._prepare import Fn, _Job

if TYPE_CHECKING:
    from dfbatch.run._stream import _Stream

P = ParamSpec("P")
CHUNK_ROWS = 100_000  # out='s rows per chunk unless chunk_rows= says
T = TypeVar("T")


async def aprocess(
    df: pl.DataFrame | pl.LazyFrame,
    fn: Fn,
    text: str | pl.Expr = "text",
    *,
    config: BatchConfig | None = None,
    progress: Progress = "auto",
    on_event: Callable[[Event], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: Resume = "auto",
    retry_errors: bool = False,
    key: str | None = None,
    out: str | os.PathLike[str] | None = None,
    chunk_rows: int | None = None,
    engine: Engine = "asyncio",
    ray_address: str | None = None,
    cache: CacheArg = None,
    cache_key: Sequence[str] | None = None,
    cache_errors: bool = False,
    **settings: Any,
) -> pl.DataFrame:
    """``await``-able ``process`` for code already inside an event loop (e.g. a notebook cell).

    The dashboard's Stop button stops the run and the partial result is returned (under the
    blocking ``process`` too, in a Jupyter kernel); so does Ctrl-C / the kernel's interrupt.

    >>> import asyncio, polars as pl, dfbatch
    >>> async def shout(batch):
    ...     return [t.upper() for t in batch["text"]]
    >>> out = asyncio.run(dfbatch.aprocess(pl.DataFrame({"text": ["x"]}), shout, progress=False))
    >>> out["output"].to_list()
    ['X']
    """
    if chunk_rows is not None and out is None:
        msg = (f"chunk_rows={chunk_rows!r} sets the rows per chunk of a run streamed to out=; "
               "drop chunk_rows=, or pass out='file.parquet' too")
        raise ConfigError(msg)
    if getattr(fn, "dfbatch_batch_api", None) is not None:  # chat(..., api="batch")
        from dfbatch.run._batch_api import run_batch_api

        return await run_batch_api(df, fn, text, config, settings, checkpoint=checkpoint,
                                   resume=resume, retry_errors=retry_errors, progress=progress,
                                   engine=engine, out=out, key=key, cache=cache,
                                   cache_key=cache_key, cache_errors=cache_errors,
                                   ray_address=ray_address, on_event=on_event)
    run: _Job | _Stream
    if out is not None:
        asyncio_only(engine, "out=")
        from dfbatch.run._stream import _Stream

        rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
        run = _Stream.create(df, fn, text, out, rows, config, settings,
                             dict(checkpoint=checkpoint, resume=resume,
                                  retry_errors=retry_errors, key=key),
                             dict(cache=cache, cache_key=cache_key, cache_errors=cache_errors))
    else:
        run = _Job.prepare(df, fn, text, config, settings, engine, ray_address)
        run.journal = open_journal(checkpoint, run.planned, fn, text, run.cfg, key=key,
                                   resume=resume, retry_errors=retry_errors)
    try:
        if isinstance(run, _Job):
            run.cache = open_cache(cache, fn, text, run.cfg, cache_key=cache_key,
                                   cache_errors=cache_errors)
            if run.cache is not None:
                check_cached_column(run.planned, run.cfg)
        # under process(): the first Ctrl-C stops the run; the Stop button works where the
        # caller delivers widget clicks while it blocks (a notebook cell)
        unclickable = on_interrupt(run.stop)
        result: pl.DataFrame = await run.execute(progress, on_event, stoppable=not unclickable)
    except BaseException:
        # a bad cache= or Ctrl-C before the pool started: release the checkpoint's lock (held
        # by this process, a rerun in the same kernel was told another run used it)
        if isinstance(run, _Job):
            run.close()
        raise
    return result


def same_parameters(
    like: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[[Callable[..., T]], Callable[P, T]]:
    """Give the decorated blocking function the parameters of the coroutine function ``like``."""

    def decorate(f: Callable[..., T]) -> Callable[P, T]:
        f.__signature__ = inspect.signature(like)  # type: ignore[attr-defined]
        return f

    return decorate


@same_parameters(aprocess)
def process(*args: Any, **kwargs: Any) -> pl.DataFrame:
    """Run ``fn`` over ``df`` in token-aware batches on a pool of async agents (blocking).

    The parameters are ``aprocess``'s. ``fn`` gets one batch (a ``pl.DataFrame`` with the
    batch's rows and all columns) and returns one output per row, in order: a list, a
    ``pl.Series`` or a ``pl.DataFrame`` (several output columns). It may be ``async def`` or a
    plain function (run in daemon worker threads). Errors are values: a failed row gets
    ``error`` text, the run goes on. ``settings`` are ``BatchConfig`` fields
    (``items_per_batch``, ``token_limit``, ``rpm``, ``tpm``, ``timeout`` …). A frame that
    already carries a plan (``df.batch.plan(...)``) runs as planned.

    Works in scripts and inside Jupyter's running loop (there the run gets a loop of its own in a
    worker thread while the cell waits, and the dashboard's Stop button works). The first Ctrl-C
    (or Stop) stops the run and returns the partial result (unfinished rows get
    ``error="cancelled"``); a second Ctrl-C raises.

    ``checkpoint="dir"`` journals finished batches there; a rerun skips the rows already done
    (``dfbatch.persist._checkpoint``: ``resume="overwrite"`` discards a checkpoint of another run,
    ``retry_errors=True`` reruns rows that ended in error, ``key=`` names a unique id column).
    ``out="out.parquet"`` streams a LazyFrame in chunks of ``chunk_rows`` rows (100,000 by
    default; only with ``out=``) to a Parquet
    file and returns a one-row summary (``dfbatch.run._stream``).

    ``cache=True`` (or a file path, or ``dfbatch.Cache(path, max_size=...)``) reuses answers
    across runs: a row whose (fn, inputs) was answered before takes the stored output
    (``attempts = 0``, ``cached = True``) and is never sent; new answers are written as they
    arrive. ``cache="refresh"`` asks every row again and overwrites. ``cache_key=[cols]`` names
    the columns that decide fn's answer (default: all input columns, or an adapter's prompt
    fields); ``cache_errors=True`` caches rows that ended in error too
    (``dfbatch.persist._cache``).

    ``engine="ray"`` runs the same plan on a Ray cluster (the one joined with ``ray.init``,
    else ``ray_address=`` / ``RAY_ADDRESS``, else a local one): each agent is a Ray actor and
    the limits stay global; see ``dfbatch.engines.ray``.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> df = pl.DataFrame({"text": ["a", "bb", "ccc", "dddd", "eeeee"]})
    >>> out = dfbatch.process(df, lambda b: b["text"].str.len_chars(), agents=2, progress=False)
    >>> out.select("text", "output", "batch_id", "error")
    shape: (5, 4)
    ┌───────┬────────┬──────────┬───────┐
    │ text  ┆ output ┆ batch_id ┆ error │
    │ ---   ┆ ---    ┆ ---      ┆ ---   │
    │ str   ┆ u32    ┆ u32      ┆ str   │
    ╞═══════╪════════╪══════════╪═══════╡
    │ a     ┆ 1      ┆ 0        ┆ null  │
    │ bb    ┆ 2      ┆ 0        ┆ null  │
    │ ccc   ┆ 3      ┆ 0        ┆ null  │
    │ dddd  ┆ 4      ┆ 0        ┆ null  │
    │ eeeee ┆ 5      ┆ 1        ┆ null  │
    └───────┴────────┴──────────┴───────┘
    """
    return run_sync(aprocess(*args, **kwargs))
