"""``process`` / ``aprocess``: plan (unless planned), run the pool, show progress, build the result.

This module wires the pieces together; each piece lives in its own module (plan, pool, limits,
retry, events, result, display, loop).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import polars as pl

from dfbatch.config import BatchConfig, Progress
from dfbatch.engines import Engine, asyncio_only
from dfbatch.events import Event
from dfbatch.execute._loop import run_sync
from dfbatch.persist._checkpoint import Resume, open_journal
from dfbatch.run._prepare import Fn, _Job


def process(
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
    chunk_rows: int = 100_000,
    engine: Engine = "asyncio",
    ray_address: str | None = None,
    **settings: Any,
) -> pl.DataFrame:
    """Run ``fn`` over ``df`` in token-aware batches on a pool of async agents (blocking).

    ``fn`` gets one batch (a ``pl.DataFrame`` with the batch's rows and all columns) and returns
    one output per row, in order: a list, a ``pl.Series`` or a ``pl.DataFrame`` (several output
    columns). It may be ``async def`` or a plain function (run in a thread pool). Errors are
    values: a failed row gets ``error`` text, the run goes on. ``settings`` are ``BatchConfig``
    fields (``items_per_batch``, ``token_limit``, ``rpm``, ``tpm``, ``timeout`` …). A frame
    that already carries a plan (``df.batch.plan(...)``) runs as planned.

    Works in scripts and inside Jupyter's running loop. The first Ctrl-C stops the run and
    returns the partial result (unfinished rows get ``error="cancelled"``); a second one raises.

    ``checkpoint="dir"`` journals finished batches there; a rerun skips the rows already done
    (``dfbatch.persist._checkpoint``: ``resume="overwrite"`` discards a checkpoint of another run,
    ``retry_errors=True`` reruns rows that ended in error, ``key=`` names a unique id column).
    ``out="out.parquet"`` streams a LazyFrame in chunks of ``chunk_rows`` rows to a Parquet
    file and returns a one-row summary (``dfbatch.run._stream``).

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
    if out is not None:
        asyncio_only(engine, "out=")
        from dfbatch.run._stream import process_stream

        return process_stream(df, fn, text, out=out, chunk_rows=chunk_rows, config=config,
                              progress=progress, on_event=on_event, checkpoint=checkpoint,
                              resume=resume, retry_errors=retry_errors, key=key, **settings)
    job = _Job.prepare(df, fn, text, config, settings, engine, ray_address)
    job.journal = open_journal(checkpoint, job.planned, fn, text, job.cfg, key=key,
                               resume=resume, retry_errors=retry_errors)
    return run_sync(job.execute(progress, on_event, stoppable=False), on_interrupt=job.stop)


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
    chunk_rows: int = 100_000,
    engine: Engine = "asyncio",
    ray_address: str | None = None,
    **settings: Any,
) -> pl.DataFrame:
    """``await``-able ``process`` for code already inside an event loop (e.g. a notebook cell).

    The dashboard's Stop button works here (it stops the run and the partial result is
    returned); under the blocking ``process`` use Ctrl-C / the kernel's interrupt instead.

    >>> import asyncio, polars as pl, dfbatch
    >>> async def shout(batch):
    ...     return [t.upper() for t in batch["text"]]
    >>> out = asyncio.run(dfbatch.aprocess(pl.DataFrame({"text": ["x"]}), shout, progress=False))
    >>> out["output"].to_list()
    ['X']
    """
    if out is not None:
        asyncio_only(engine, "out=")
        from dfbatch.run._stream import aprocess_stream

        return await aprocess_stream(df, fn, text, out=out, chunk_rows=chunk_rows,
                                     config=config, progress=progress, on_event=on_event,
                                     checkpoint=checkpoint, resume=resume,
                                     retry_errors=retry_errors, key=key, **settings)
    job = _Job.prepare(df, fn, text, config, settings, engine, ray_address)
    job.journal = open_journal(checkpoint, job.planned, fn, text, job.cfg, key=key,
                               resume=resume, retry_errors=retry_errors)
    return await job.execute(progress, on_event, stoppable=True)
