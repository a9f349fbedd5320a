"""``process`` / ``aprocess``: plan (unless planned), run the pool, show progress, build the result.

This module wires the pieces together; each piece lives in its own module (plan, pool, limits,
retry, events, result, display, loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from dfbatch.checkpoint import Journal, Resume, open_journal
from dfbatch.config import BatchConfig, Progress
from dfbatch.engines import Engine, asyncio_only, select
from dfbatch.errors import ConfigError
from dfbatch.events import Event, RunFinished, RunStarted, RunStats, StatsAccumulator
from dfbatch.loop import run_sync
from dfbatch.pool import Batch, Pool
from dfbatch.result import assemble

Fn = Callable[[pl.DataFrame], Any]
_REFRESH_S = 0.25
_ROW_OVERHEAD_BYTES = 64


class PartialResultWarning(UserWarning):
    """The run was stopped (Ctrl-C / Stop button) before every row finished."""


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
    (``dfbatch.checkpoint``: ``resume="overwrite"`` discards a checkpoint of another run,
    ``retry_errors=True`` reruns rows that ended in error, ``key=`` names a unique id column).
    ``out="out.parquet"`` streams a LazyFrame in chunks of ``chunk_rows`` rows to a Parquet
    file and returns a one-row summary (``dfbatch.stream``).

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
        from dfbatch.stream import process_stream

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
        from dfbatch.stream import aprocess_stream

        return await aprocess_stream(df, fn, text, out=out, chunk_rows=chunk_rows,
                                     config=config, progress=progress, on_event=on_event,
                                     checkpoint=checkpoint, resume=resume,
                                     retry_errors=retry_errors, key=key, **settings)
    job = _Job.prepare(df, fn, text, config, settings, engine, ray_address)
    job.journal = open_journal(checkpoint, job.planned, fn, text, job.cfg, key=key,
                               resume=resume, retry_errors=retry_errors)
    return await job.execute(progress, on_event, stoppable=True)


@dataclass
class _Job:
    fn: Fn
    cfg: BatchConfig
    planned: pl.DataFrame
    send: pl.DataFrame  # what fn sees (texts truncated under oversize="truncate")
    batches: list[list[Batch]]
    row_tokens: np.ndarray
    row_bytes: np.ndarray
    pool: Pool | None = None
    stop_requested: bool = False
    journal: Journal | None = None  # checkpoint=: skip journaled rows, journal finished ones
    pool_type: type[Pool] = Pool  # the engine's pool (RayPool under engine="ray")

    @classmethod
    def prepare(
        cls, df: Any, fn: Fn, text: str | pl.Expr, config: BatchConfig | None, settings: Any,
        engine: str = "asyncio", ray_address: str | None = None,
    ) -> _Job:
        if not callable(fn):
            msg = f"fn must be a callable taking one batch (a pl.DataFrame), got {fn!r}"
            raise ConfigError(msg)
        cfg = BatchConfig.from_kwargs(config, **settings)
        pool_type, cfg = select(engine, cfg, ray_address)
        expected_out = getattr(fn, "dfbatch_output_tokens", None)
        if isinstance(expected_out, int) and "output_tokens_per_row" not in settings:
            cfg = cfg.replace(output_tokens_per_row=expected_out)
        if isinstance(df, pl.LazyFrame):
            df = df.collect()
        if not isinstance(df, pl.DataFrame):
            msg = f"df must be a polars DataFrame or LazyFrame, got {type(df).__name__}"
            raise ConfigError(msg)
        planned = _planned(df, text, cfg)
        send, row_tokens = _to_send(planned, text, cfg)
        row_bytes = _row_bytes(planned, text)
        batches = _batches(planned, row_tokens, row_bytes, cfg)
        return cls(fn, cfg, planned, send, batches, row_tokens, row_bytes, pool_type=pool_type)

    def stop(self) -> None:
        self.stop_requested = True
        if self.pool is not None:
            self.pool.stop()
        else:  # interrupted before the pool started: nothing done, stop now
            raise KeyboardInterrupt

    async def execute(
        self, progress: Progress, on_event: Callable[[Event], None] | None, *, stoppable: bool
    ) -> pl.DataFrame:
        loop = asyncio.get_running_loop()
        acc = StatsAccumulator()

        def emit(ev: Event) -> None:
            acc.apply(ev)
            if on_event is not None:
                on_event(ev)

        reserved = set(self.planned.columns) | set(self.cfg.columns.result_names())
        frame, batches, tokens, nbytes = self.send, self.batches, self.row_tokens, self.row_bytes
        if self.journal is not None:
            frame, batches, tokens, nbytes = self.journal.restrict(frame, batches, tokens, nbytes)
        pool = self.pool_type(
            self.fn, frame, batches, self.cfg, row_tokens=tokens, row_bytes=nbytes, emit=emit,
            reserved=reserved,
            on_batch_done=self.journal.record if self.journal is not None else None,
        )
        self.pool = pool
        c = self.cfg.columns
        per_agent = tuple(sum(b.tokens for b in q) for q in batches)  # request tokens, as done
        emit(RunStarted(loop.time(), frame.height, sum(len(q) for q in batches),
                        sum(per_agent), per_agent))
        display = _open_display(progress, frame.height, pool.stop if stoppable else None)
        ticker = asyncio.create_task(_tick(display, acc)) if display is not None else None
        try:
            outcomes = await pool.run()
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            unfinished = pool.cancelled_rows
            emit(RunFinished(loop.time(), cancelled=unfinished > 0))
            if display is not None:
                _safe(display.close, acc.snapshot())
            if self.journal is not None:
                self.journal.close()
        if unfinished:
            msg = (
                f"run stopped: {unfinished} of {self.planned.height} rows unfinished "
                "(error='cancelled'); their outputs are null"
            )
            warnings.warn(msg, PartialResultWarning, stacklevel=3)
        if self.journal is not None:
            outcomes = self.journal.merge(outcomes)
        return assemble(self.planned, outcomes, c)


def _planned(df: pl.DataFrame, text: str | pl.Expr, cfg: BatchConfig) -> pl.DataFrame:
    c = cfg.columns
    names = c.plan_names()
    present = [x for x in names if x in df.columns]
    if len(present) == len(names):
        return df  # already planned: run as planned
    from dfbatch.plan import plan

    return plan(df, text, config=cfg)


def _text_name(text: str | pl.Expr) -> str | None:
    return text if isinstance(text, str) else None


def _to_send(
    planned: pl.DataFrame, text: str | pl.Expr, cfg: BatchConfig
) -> tuple[pl.DataFrame, np.ndarray]:
    c = cfg.columns
    tokens = planned[c.n_tokens].to_numpy().astype(np.int64)
    over = _oversize_rows(tokens, cfg)
    if cfg.oversize != "truncate" or not over.any():
        return planned, tokens
    name = _text_name(text)
    if name is None or name not in planned.columns:
        msg = "oversize='truncate' needs text= to name a column of the frame"
        raise ConfigError(msg)
    from dfbatch.tokens import truncate

    budget = cfg.token_limit - cfg.request_overhead_tokens - cfg.output_tokens_per_row
    if budget <= 0:
        msg = (
            f"token_limit={cfg.token_limit} leaves no room for text after "
            "request_overhead_tokens and output_tokens_per_row; raise token_limit"
        )
        raise ConfigError(msg)
    idx = np.flatnonzero(over)
    short = truncate(planned[name].gather(idx), budget, cfg.encoding)
    send = planned.with_columns(planned[name].scatter(idx, short))
    tokens = tokens.copy()
    tokens[idx] = np.minimum(tokens[idx], budget)
    return send, tokens


def _oversize_rows(tokens: np.ndarray, cfg: BatchConfig) -> np.ndarray:
    need = cfg.request_overhead_tokens + tokens + cfg.output_tokens_per_row
    return need > cfg.token_limit


def _batches(
    planned: pl.DataFrame, tokens: np.ndarray, row_bytes: np.ndarray, cfg: BatchConfig
) -> list[list[Batch]]:
    """Group row positions by planned batch (vectorized) into per-agent lists of Batch."""
    c = cfg.columns
    n_agents = cfg.n_agents
    if planned.height == 0:
        return [[] for _ in range(n_agents)]
    bid = planned[c.batch_id].to_numpy()
    aid = planned[c.agent_id].to_numpy().astype(np.int64)
    n_agents = max(n_agents, int(aid.max()) + 1)
    order = np.argsort(bid, kind="stable")
    ids, starts = np.unique(bid[order], return_index=True)
    groups = np.split(order, starts[1:])
    counts = np.diff(np.append(starts, len(order)))
    btok = np.add.reduceat(tokens[order], starts)
    btok = btok + cfg.request_overhead_tokens + cfg.output_tokens_per_row * counts
    nbytes = np.add.reduceat(row_bytes[order], starts)
    agents = aid[order[starts]]
    call = cfg.oversize == "call"
    out: list[list[Batch]] = [[] for _ in range(n_agents)]
    for i in range(len(ids)):  # one Batch object per batch (not per row)
        out[int(agents[i])].append(Batch(int(ids[i]), int(agents[i]), groups[i], int(btok[i]),
                                         int(nbytes[i]), call and counts[i] == 1))
    return out


def _row_bytes(planned: pl.DataFrame, text: str | pl.Expr) -> np.ndarray:
    name = _text_name(text)
    if name is not None and name in planned.columns and planned[name].dtype == pl.Utf8:
        sizes = planned[name].str.len_bytes().fill_null(0).to_numpy().astype(np.int64)
        return sizes + _ROW_OVERHEAD_BYTES * planned.width
    return np.full(planned.height, _ROW_OVERHEAD_BYTES * planned.width, np.int64)


def _open_display(progress: Progress, total: int, stop: Callable[[], None] | None) -> Any:
    if progress is False:
        return None
    from dfbatch.display import open_display

    return open_display(progress, total_rows=total, stop=stop)


async def _tick(display: Any, acc: StatsAccumulator) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(_REFRESH_S)
        _safe(display.update, acc.snapshot(loop.time()))


def _safe(method: Callable[[RunStats], None], stats: RunStats) -> None:
    try:
        method(stats)
    except Exception as exc:  # a display must never break the run
        warnings.warn(f"progress display failed: {exc!r}", RuntimeWarning, stacklevel=2)

