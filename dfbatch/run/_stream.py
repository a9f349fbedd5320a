"""Larger than memory: process a LazyFrame in chunks of rows, streaming the result to Parquet.

``lf.batch.process(fn, text="doc", out="out.parquet", chunk_rows=100_000)`` reads the input
``chunk_rows`` rows at a time (``LazyFrame.collect_batches``), plans each chunk (token counts,
packing, balancing per chunk), runs it on the agent pool and appends its result, in input
order, to one Parquet file (pyarrow ``ParquetWriter``; written under a temporary name and
renamed when complete). Peak memory is bounded by a few chunks, not by the dataset.

No idle gap at chunk boundaries: the next chunk is read and planned in a worker thread while the
current one runs, and its pool starts as soon as the current pool's queues are empty (its last
batches still in flight). The run's limit stack (``RunLimits``: global in-flight cap, per-agent
concurrency and bytes, adaptive concurrency, RPM/TPM buckets, dynamic batch size) is built once
and handed to every chunk's pool, so the agents and their limits carry over from chunk to chunk
and the caps hold across the overlap. A column that every row so far left null (a chunk that
failed entirely) takes the type of the first chunk that brings values.
At most two pools run at once, and a third chunk is being prepared.

The output has the columns of the DataFrame result (``dfbatch.process``); ``batch_id`` and
``run_batch_id`` are made unique across chunks. The return value is a one-row summary frame
(``out``, ``rows``, ``rows_ok``, ``rows_failed``, ``rows_cancelled``, ``chunks``,
``elapsed_s``); read the output with ``pl.scan_parquet(out)``. With ``checkpoint=``, each chunk
journals to its own subdirectory (``chunk-<first row>-<rows>``), so a rerun replays done chunks
without calls. After Ctrl-C the file holds the chunks started so far (unfinished rows have
``error="cancelled"``); rows of chunks never started are not in it.

Examples
--------
>>> import tempfile, os, polars as pl, dfbatch
>>> lf = pl.LazyFrame({"text": [f"doc {i}" for i in range(10)]})
>>> path = os.path.join(tempfile.mkdtemp(), "out.parquet")
>>> s = lf.batch.process(lambda b: b["text"].str.len_chars(), out=path, chunk_rows=4,
...                      progress=False)
>>> s.select("rows", "rows_ok", "chunks").row(0)
(10, 10, 3)
>>> pl.read_parquet(path)["output"].to_list()
[5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import gc
import os
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from dfbatch.config import BatchConfig, Progress
from dfbatch.errors import ConfigError, PartialResultWarning, RunStoppedError, warn_user
from dfbatch.events import Event, RunFinished, RunStarted, StatsAccumulator
from dfbatch.execute._pool import Pool
from dfbatch.execute._recorder import Outcomes
from dfbatch.execute._result import assemble
from dfbatch.execute._stack import RunLimits
from dfbatch.persist._cache_run import open_cache
from dfbatch.persist._checkpoint import Journal, open_journal
from dfbatch.run._prepare import _Job, resolve
from dfbatch.run._wiring import ChunkTally, open_display, safe, tick
from dfbatch.run._writer import Writer

Fn = Callable[[pl.DataFrame], Any]


@dataclass
class _Chunk:
    """One chunk of rows: its plan, journal, pool and the task running the pool."""

    offset: int
    job: _Job
    journal: Journal | None
    pool: Pool | None = None
    task: asyncio.Task[Outcomes] | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    left: Any = None  # under cache=: what is left after the lookup (``_Job.narrow``)


@dataclass
class _Stream:
    lf: pl.LazyFrame
    fn: Fn
    text: str | pl.Expr
    out: Path
    chunk_rows: int
    cfg: BatchConfig
    journal_opts: dict[str, Any]
    stopping: bool = False
    live: deque[_Chunk] = field(default_factory=deque)
    limits: RunLimits | None = None  # built once, shared by every chunk's pool
    built: list[RunLimits] = field(default_factory=list)  # (closed as the run ends)
    batch_offset: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    fatal: str | None = None  # why the run stopped at once (RunStoppedError)
    cache_opts: dict[str, Any] = field(default_factory=dict)  # cache=, cache_key=, ... per chunk
    _stop: asyncio.Event | None = None

    @classmethod
    def create(cls, df: Any, fn: Fn, text: str | pl.Expr, out: str | os.PathLike[str],
               chunk_rows: int, config: BatchConfig | None, settings: dict[str, Any],
               journal_opts: dict[str, Any], cache_opts: dict[str, Any] | None = None) -> _Stream:
        df, path = _checked(df, out, chunk_rows)
        # validates fn, settings and text against the schema before reading any data
        empty = pl.DataFrame(schema=df.collect_schema())
        cfg, _ = resolve(fn, config, settings)
        _Job.with_config(empty, fn, text, cfg)
        if journal_opts["checkpoint"] is None:  # key= etc. without checkpoint= is an error
            open_journal(None, empty, fn, text, cfg, key=journal_opts["key"],
                         resume=journal_opts["resume"], retry_errors=journal_opts["retry_errors"])
        cache_opts = {"cache": None, **(cache_opts or {})}
        if open_cache(fn=fn, text=text, cfg=cfg, **cache_opts) is None:  # checks the options
            cache_opts = {}
        counts = dict.fromkeys(("rows", "rows_ok", "rows_failed", "rows_cancelled", "chunks"), 0)
        return cls(df, fn, text, path, chunk_rows, cfg, journal_opts, counts=counts,
                   cache_opts=cache_opts)

    def stop(self) -> None:
        """Graceful stop (first Ctrl-C / Stop button): read no more chunks, stop the pools."""
        for pool in self._read_no_more():
            pool.stop()

    def _drain(self) -> None:
        """A call failed for good: read no more chunks; the pools send nothing more, and
        stop once their calls in flight (sent: paid for) are back, or after ``DRAIN_S``."""
        for pool in self._read_no_more():
            pool.drain()

    def _read_no_more(self) -> list[Pool]:
        """Stop reading chunks; the pools of the chunks being run."""
        self.stopping = True
        if self._stop is not None:
            self._stop.set()
        return [chunk.pool for chunk in self.live if chunk.pool is not None]

    async def execute(
        self, progress: Progress, on_event: Callable[[Event], None] | None, *, stoppable: bool
    ) -> pl.DataFrame:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        acc = StatsAccumulator()

        def emit(ev: Event) -> None:
            acc.apply(ev)
            if on_event is not None:
                on_event(ev)

        total = await asyncio.to_thread(lambda: self.lf.select(pl.len()).collect().item())
        t0 = time.monotonic()
        emit(RunStarted(loop.time(), int(total), 0, 0, ()))
        display = open_display(progress, int(total), self.stop if stoppable else None)
        ticker = asyncio.create_task(tick(display, acc)) if display is not None else None
        writer = Writer(self.out, self.cfg.columns.error)
        try:
            await self._run(acc, on_event, writer)
            writer.commit()
        finally:
            writer.abort()
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            emit(RunFinished(loop.time(), cancelled=self.stopping))
            if display is not None:
                safe(display.close, acc.snapshot())
        summary = pl.DataFrame({"out": [str(self.out)],
                                **{k: [v] for k, v in self.counts.items()},
                                "elapsed_s": [time.monotonic() - t0]})
        if self.fatal is not None:  # the rows written so far are the partial result
            raise RunStoppedError(self.fatal, partial=summary)
        if self.stopping:
            msg = (f"run stopped: {self.counts['rows']} of {total} rows written to {self.out}, "
                   f"{self.counts['rows_cancelled']} of them unfinished (error='cancelled')")
            warn_user(msg, PartialResultWarning)
        return summary

    # -- the chunk pipeline ------------------------------------------------------------------
    async def _run(self, acc: StatsAccumulator, on_event: Callable[[Event], None] | None,
                   writer: Writer) -> None:
        reader = _chunks(self.lf, self.chunk_rows)
        offset = 0
        nxt: asyncio.Future[_Chunk | None] = asyncio.ensure_future(
            asyncio.to_thread(self._prepare, reader, offset))
        try:
            while not self.stopping:
                chunk = await self._unless_stopped(nxt)
                if chunk is None:
                    break
                self.live.append(chunk)  # (closes its journal if the next line raises)
                self._raise_crash()
                offset += chunk.job.planned.height
                self._start(chunk, acc, on_event)
                # read and plan the next chunk while this one runs
                nxt = asyncio.ensure_future(asyncio.to_thread(self._prepare, reader, offset))
                await chunk.drained.wait()  # its queues are empty: the next pool may start
                self._raise_crash()
                while len(self.live) > 1:  # at most two pools at once
                    await self._finish(self.live[0], writer)
            while self.live:
                await self._finish(self.live[0], writer)
        finally:
            await self._cancel_live()
            for limits in self.built:  # every pool is over: no timer of theirs may fire
                limits.close()
            # a worker thread cannot be cancelled: wait for the chunk it prepares (bounded by
            # one chunk), and release its journal
            leftover = None
            with contextlib.suppress(Exception):
                leftover = await nxt
            if leftover is not None:
                leftover.job.close()

    def _raise_crash(self) -> None:
        for c in self.live:
            if c.task is not None and c.task.done() and not c.task.cancelled():
                exc = c.task.exception()
                if exc is not None:
                    raise exc

    async def _unless_stopped(self, fut: asyncio.Future[_Chunk | None]) -> _Chunk | None:
        assert self._stop is not None
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([fut, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
        return None if self.stopping else await fut

    def _prepare(self, reader: Iterator[pl.DataFrame], offset: int) -> _Chunk | None:
        """Read and plan the next chunk (runs in a worker thread)."""
        df = next(reader, None)
        if df is None or df.height == 0:
            return None
        job = _Job.with_config(df, self.fn, self.text, self.cfg)
        opts = dict(self.journal_opts)
        base = opts.pop("checkpoint")
        where = None if base is None else Path(base) / f"chunk-{offset:012d}-{df.height}"
        job.journal = open_journal(where, job.planned, self.fn, self.text, self.cfg, **opts)
        chunk = _Chunk(offset, job, job.journal)
        if self.cache_opts:
            job.cache = open_cache(fn=self.fn, text=self.text, cfg=self.cfg, **self.cache_opts)
            if job.cache is not None:  # here, in the reader thread, not on the loop
                chunk.left = job.narrow()
        return chunk

    def _start(self, chunk: _Chunk, acc: StatsAccumulator,
               on_event: Callable[[Event], None] | None) -> None:
        job = chunk.job
        if self.limits is None or len(self.limits.agent_slots) != job.batches.n_agents:
            self.limits = job.limits()  # the agents and their limits carry over
            self.built.append(self.limits)
        pool = job.pool_for(on_event, self.limits, left=chunk.left)
        # the run's counts take each batch from its fields (and tell when the queues empty);
        # only on_event gets batch events
        pool.recorder.listen(ChunkTally(acc, pool.sched.queued, chunk.drained), on_event)
        chunk.pool = pool
        chunk.task = asyncio.create_task(pool.run())
        chunk.task.add_done_callback(self._on_pool_done(chunk))
        if self.stopping:
            pool.stop()

    def _on_pool_done(self, chunk: _Chunk) -> Callable[[asyncio.Task[Outcomes]], None]:
        def done(task: asyncio.Task[Outcomes]) -> None:
            chunk.drained.set()
            if not task.cancelled() and task.exception() is not None:
                for other in self.live:  # a crash (a bug, or a BaseException in fn): wake up
                    other.drained.set()  # the pipeline so it re-raises at once

        return done

    async def _finish(self, chunk: _Chunk, writer: Writer) -> None:
        assert chunk.task is not None and chunk.pool is not None
        try:
            outcomes = await chunk.task
        finally:
            await asyncio.to_thread(chunk.job.close)
        self.live.popleft()
        if chunk.pool.fatal is not None and self.fatal is None:
            self.fatal = chunk.pool.fatal  # e.g. a refused key: read no more chunks; the
            self._drain()  # other pools bring back the answers of the calls they sent
        outcomes = chunk.job.merge(outcomes)
        offset = self.batch_offset
        self.batch_offset += max(chunk.pool.sched.next_id, 1)
        result = await asyncio.to_thread(_chunk_result, chunk.job.planned, outcomes, offset,
                                         self.cfg, self.counts)
        result = chunk.job.finish(result)
        await asyncio.to_thread(writer.write, result)
        del chunk, outcomes, result
        gc.collect()  # a finished pool sits in reference cycles: free its chunk's memory now

    async def _cancel_live(self) -> None:
        tasks = [c.task for c in self.live if c.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self.live:
            c.job.close()
        self.live.clear()


def _checked(df: Any, out: str | os.PathLike[str], chunk_rows: int) -> tuple[pl.LazyFrame, Path]:
    if isinstance(df, pl.DataFrame):
        df = df.lazy()
    if not isinstance(df, pl.LazyFrame):
        msg = f"df must be a polars LazyFrame or DataFrame, got {type(df).__name__}"
        raise ConfigError(msg)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        msg = f"chunk_rows must be an integer > 0, got {chunk_rows!r}"
        raise ConfigError(msg)
    path = Path(out)
    if path.suffix.lower() != ".parquet":
        msg = (f"out={str(out)!r}: the result is written as Parquet; name the file *.parquet "
               "(e.g. out='result.parquet'), and convert it afterwards if needed")
        raise ConfigError(msg)
    if not path.parent.is_dir():
        msg = f"out={str(out)!r}: directory {str(path.parent)!r} does not exist; create it"
        raise ConfigError(msg)
    if _scans(df, path):
        msg = (f"out={str(out)!r} is a file the LazyFrame reads: writing it would replace the "
               "input; write the result to another file")
        raise ConfigError(msg)
    return df, path


def _scans(lf: pl.LazyFrame, path: Path) -> bool:
    """Whether ``lf``'s plan reads ``path`` (its scans' sources, in the plan or its bytes)."""
    target = path.resolve()
    try:
        plan = lf.explain(optimized=False)
    except Exception:
        plan = ""
    for listed in re.findall(r"SCAN \[(.*?)\]", plan):
        for source in listed.split(", "):
            if source and not source.startswith("...") and Path(source).resolve() == target:
                return True
    try:  # a long source list is shortened in the plan; the serialized plan holds all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = lf.serialize()
    except Exception:
        return False
    if re.search(re.escape(str(target).encode()) + rb"(?![\w.\-/])", blob) is not None:
        return True
    parent = str(target.parent).encode()  # a glob over out's directory (``dir/*.parquet``)
    for m in re.finditer(re.escape(parent) + rb"/([\x20-\x7e]{1,300})", blob):
        run = m.group(1).decode()
        if any(c in run for c in "*?[") and any(
                fnmatch.fnmatchcase(target.name, run[:i]) for i in range(1, len(run) + 1)):
            return True
    return False


def _chunk_result(planned: pl.DataFrame, outcomes: Outcomes, offset: int, cfg: BatchConfig,
                  counts: dict[str, int]) -> pl.DataFrame:
    """A chunk's result frame, batch ids made unique across chunks; counts its rows."""
    c = cfg.columns
    result = assemble(planned, outcomes, c, cfg.output_dtype).with_columns(
        pl.col(c.batch_id, c.run_batch_id) + offset)
    error = result[c.error]
    cancelled = int((error == "cancelled").sum())
    counts["rows"] += result.height
    counts["rows_cancelled"] += cancelled
    counts["rows_failed"] += int(error.is_not_null().sum()) - cancelled
    counts["rows_ok"] += int(error.is_null().sum())
    counts["chunks"] += 1
    return result


def _chunks(lf: pl.LazyFrame, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """The rows of ``lf``, ``chunk_rows`` at a time, without collecting the whole frame."""
    if hasattr(lf, "collect_batches"):
        yield from lf.collect_batches(chunk_size=chunk_rows, lazy=True)
        return
    offset = 0  # pragma: no cover - polars without collect_batches: slices (pushed down)
    while True:  # pragma: no cover
        df = lf.slice(offset, chunk_rows).collect()
        if df.height == 0:
            return
        yield df
        offset += df.height
