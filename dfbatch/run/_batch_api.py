"""``process`` with an adapter built with ``api="batch"``: the frame runs as Batch API jobs.

The plan is made as usual (``n_tokens``, ``batch_id``, ``agent_id`` stay in the result); then
every row still to answer becomes one JSONL line whose ``custom_id`` is ``<row>-<hash of its
request>``, the lines are cut into files within the provider's limits
(``dfbatch.llm.batch_api.split_files``), and each file is uploaded and made a job, while the
tokens of the jobs in flight stay within the model's enqueued-token limit
(``BatchLimits.max_enqueued_tokens``; later files wait for a job to end). Every step is
journaled first (``dfbatch.run._batch_journal``, held under a lock file), so a rerun after a
crash polls the jobs that exist and never uploads or creates them twice, and a second process
on the same journal is refused. Jobs are polled with a doubling wait and shown as they change
(``dfbatch.run._batch_view``: events, the live view, or stderr lines);
when one is over its output and error files are read back: outputs as a synchronous run gives
them, per-row errors as values, and rows in neither file (expired or cancelled jobs) get an
error ``batch_<status>: ...``; the next run submits them again. ``retry_errors=True``
resubmits the rows that ended in error too. Ctrl-C stops waiting (the jobs go on at the
provider; a rerun collects them) and returns what was collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig, Progress
from dfbatch.errors import ConfigError, PartialResultWarning, RowError
from dfbatch.events import (
    BatchFinished,
    BatchStarted,
    Event,
    RunFinished,
    RunStarted,
    StatsAccumulator,
)
from dfbatch.execute._loop import on_interrupt
from dfbatch.execute._recorder import Outcomes
from dfbatch.execute._result import assemble
from dfbatch.llm import batch_api as api
from dfbatch.llm.batch_api import Answer, BatchAdapter
from dfbatch.run._batch_journal import BatchJournal, FileEntry, Stored
from dfbatch.run._batch_view import JobView
from dfbatch.run._prepare import Fn, _Job
from dfbatch.run._wiring import open_display, safe, tick

_STILL_RUNNING = "batch job not finished yet: rerun with the same settings to collect it"
_NOT_SENT = "not submitted: the run was stopped first; rerun to submit"
_MAX_MISSES = 8
_ABANDONED = "abandoned"  # an intent whose upload never reached the provider


def _transient() -> tuple[type[BaseException], ...]:
    from dfbatch.llm.client import import_openai

    openai = import_openai()
    return (openai.APIConnectionError, openai.APIStatusError)


async def run_batch_api(
    df: Any, fn: Fn, text: str | pl.Expr, config: BatchConfig | None, settings: dict[str, Any],
    *, checkpoint: Any = None, resume: str = "auto", retry_errors: bool = False,
    progress: Progress = "auto", engine: Any = "asyncio", out: Any = None, key: str | None = None,
    cache: Any = None, cache_key: Any = None, cache_errors: bool = False,
    ray_address: str | None = None, on_event: Callable[[Event], None] | None = None,
) -> pl.DataFrame:
    """Run ``df`` through the Batch API adapter of ``fn`` (see the module docstring)."""
    refuse_unsupported(out=out, engine=engine, cache=cache, cache_key=cache_key,
                       cache_errors=cache_errors, ray_address=ray_address)
    adapter: BatchAdapter = fn.dfbatch_batch_api  # type: ignore[attr-defined]
    job = _Job.prepare(df, fn, text, config, settings)
    fingerprint = {"fn": getattr(fn, "dfbatch_fingerprint", None), "api": "batch"}
    if key is not None and key not in job.planned.columns:
        msg = f"key={key!r} is not a column of the frame; name a unique id column"
        raise ConfigError(msg)
    journal = BatchJournal.open(checkpoint, fingerprint, overwrite=resume == "overwrite")
    acc = StatsAccumulator()

    def emit(ev: Event) -> None:
        acc.apply(ev)
        if on_event is not None:
            on_event(ev)

    try:
        run = _BatchRun(adapter, job, journal, retry_errors, key)
        unclickable = on_interrupt(run.stop)
        display = open_display(progress, job.planned.height, None if unclickable else run.stop)
        run.view = JobView(emit, lines=progress is not False and display is None,
                           price=getattr(fn, "dfbatch_price", None),
                           discount=adapter.limits.discount)
        loop = asyncio.get_running_loop()
        ticker = asyncio.create_task(tick(display, acc)) if display is not None else None
        try:
            await run.go()
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            emit(RunFinished(loop.time(), cancelled=run._stopping.is_set()))
            if display is not None:
                safe(display.close, acc.snapshot())
        return _result(run)
    finally:
        journal.close()


def refuse_unsupported(*, out: Any, engine: Any, cache: Any, cache_key: Any = None,
                       cache_errors: bool = False, ray_address: str | None = None) -> None:
    """Arguments of ``process`` a Batch API run cannot honour: refused before anything runs.

    >>> refuse_unsupported(out="o.parquet", engine="asyncio", cache=None)
    Traceback (most recent call last):
    ...
    dfbatch.errors.ConfigError: out='o.parquet' streams chunks as they finish, ...
    """
    if out is not None:
        msg = (f"out={str(out)!r} streams chunks as they finish, but an adapter built with "
               "api='batch' answers when its provider jobs are over: drop out= and write the "
               "returned frame (df.write_parquet(...)), or build the adapter with api='sync'")
        raise ConfigError(msg)
    if engine != "asyncio" or ray_address is not None:
        named = f"engine={engine!r}" if engine != "asyncio" else f"ray_address={ray_address!r}"
        drop = "engine= (or pass engine='asyncio')" if engine != "asyncio" else "ray_address="
        msg = (f"{named}: an adapter built with api='batch' runs as provider jobs "
               f"from this process (there is nothing to spread over workers): drop {drop}, "
               "or build the adapter with api='sync'")
        raise ConfigError(msg)
    if cache is not None and cache is not False:
        msg = ("cache= does not apply to an adapter built with api='batch' (its journal "
               "already keeps every answer, and a rerun reuses them): drop cache=")
        raise ConfigError(msg)
    if cache_key is not None:
        msg = (f"cache_key={cache_key!r} keys the response cache (cache=), which an adapter "
               "built with api='batch' does not use: its journal (checkpoint=) finds each row "
               "by its request (or key=<id column>): drop cache_key=")
        raise ConfigError(msg)
    if cache_errors:
        msg = ("cache_errors=True applies to the response cache (cache=), which an adapter "
               "built with api='batch' does not use: its journal keeps failed rows already "
               "(retry_errors=True asks them again on a rerun): drop cache_errors=")
        raise ConfigError(msg)


class _BatchRun:
    """One Batch API run: its rows as request lines, its journal, submission and polling."""

    def __init__(self, adapter: BatchAdapter, job: _Job, journal: BatchJournal,
                 retry_errors: bool, key: str | None = None) -> None:
        self.adapter = adapter
        self.job = job
        self.journal = journal
        self.retry_errors = retry_errors
        self.lines = [b""] * job.planned.height
        self.ids = self._custom_ids(key)
        self._stopping = asyncio.Event()
        self.view = JobView(lambda ev: None, lines=False, price=None, discount=1.0)
        self._misses = 0
        self._rows_of: dict[str, int] | None = None
        self._waiting: deque[list[int]] = deque()  # files (row lists) not submitted yet
        self._row_costs: np.ndarray | None = None

    def stop(self) -> None:
        self._stopping.set()

    def _custom_ids(self, key: str | None) -> list[str]:
        """``<row>-<hash of the request>``: the row's position, or its ``key`` value (hashed
        when it is long or holds other characters than letters, digits, ``_`` and ``-``)."""
        bodies = self.adapter.bodies(self.job.send)
        names: list[Any] = (list(range(len(bodies))) if key is None
                            else self.job.planned[key].cast(pl.String).to_list())
        if key is not None and len(set(names)) != len(names):
            msg = f"key={key!r} must be unique per row (it names each row's request)"
            raise ConfigError(msg)
        ids = []
        for i, body in enumerate(bodies):
            cid = api.custom_id(names[i], body)
            self.lines[i] = api.request_line(cid, self.adapter.endpoint, body)
            ids.append(cid)
        return ids

    # -- which rows still need what ------------------------------------------------------
    def _answered(self, cid: str) -> bool:
        got = self.journal.answers.get(cid)
        if got is None or got.resumable:
            return False
        return not (self.retry_errors and got.error is not None and got.file < self._round)

    def _todo(self) -> list[int]:
        wanted = {cid for cid in self.ids if not self._answered(cid)}
        for entry in self.journal.live():
            if wanted.intersection(entry.rows):
                wanted.difference_update(entry.rows)  # in a job already: poll it, never resend
        return [i for i, cid in enumerate(self.ids) if cid in wanted]

    async def go(self) -> None:
        self._round = len(self.journal.files)  # errors from earlier runs are retried once
        client = await self.adapter.source.get()
        mine = set(self.ids)
        live = []
        for entry in self.journal.live():
            if not mine.intersection(entry.rows):
                continue
            if entry.file_id is None:
                entry.file_id = await api.find_file(client, entry.name, entry.intent_at)
            if entry.file_id is None:  # never reached the provider: its rows are split anew
                entry.status, entry.collected = _ABANDONED, True
                self.journal.save()
                continue
            live.append(entry)
            await self._submit(client, entry)
        parts = self._parts(self._todo())
        self._started(live, parts)
        self._waiting.extend(parts)
        await self._fill(client, live)
        await self._poll(client, live)

    async def _fill(self, client: Any, live: list[FileEntry]) -> None:
        """Submit waiting files, in order, while the tokens of the jobs in flight stay within
        the model's enqueued-token limit (``BatchLimits.max_enqueued_tokens``); the others
        wait for a job to end. With nothing in flight the next file always goes."""
        cap = self.adapter.limits.max_enqueued_tokens
        while self._waiting and not self._stopping.is_set():
            part = self._waiting[0]
            cost = int(self._costs()[part].sum())
            if cap is not None and live and sum(e.tokens for e in live) + cost > cap:
                return
            self._waiting.popleft()
            entry = self.journal.add_file([self.ids[i] for i in part], cost)  # intent first
            live.append(entry)
            await self._submit(client, entry, fresh=True)
            self._job_started(entry)

    def _started(self, live: list[FileEntry], parts: list[list[int]]) -> None:
        """Events: each job is one "batch" of agent 0 (``on_event`` / ``RunStats`` see them)."""
        t = asyncio.get_running_loop().time()
        rows = sum(len(e.rows) for e in live) + sum(len(p) for p in parts)
        self.view.emit(RunStarted(t, rows, len(live) + len(parts), 0, (0,)))
        for entry in live:
            self._job_started(entry)

    def _job_started(self, entry: FileEntry) -> None:
        index = self.journal.files.index(entry)
        t = asyncio.get_running_loop().time()
        self.view.emit(BatchStarted(t, index, 0, 0, len(entry.rows), 0, 1))

    def _where(self) -> dict[str, int]:
        if self._rows_of is None:
            self._rows_of = {cid: i for i, cid in enumerate(self.ids)}
        return self._rows_of

    def _costs(self) -> np.ndarray:
        """Each row's request tokens as the provider's token limits count them (prompt and
        output cap), for the per-file and the enqueued-token limits."""
        if self._row_costs is None:
            cfg = self.job.cfg
            self._row_costs = (self.job.row_tokens + cfg.request_overhead_tokens
                               + cfg.output_tokens_per_row)
        return self._row_costs

    def _parts(self, rows: list[int]) -> list[list[int]]:
        if not rows:
            return []
        idx = np.asarray(rows, dtype=np.int64)
        sizes = np.fromiter((len(self.lines[i]) for i in rows), np.int64, len(rows))
        tokens = self._costs()[idx]
        return [idx[p].tolist() for p in api.split_files(sizes, self.adapter.limits, tokens)]

    async def _submit(self, client: Any, entry: FileEntry, fresh: bool = False) -> None:
        """Upload and create what ``entry`` still lacks. An entry from an earlier run looks
        at the provider first (its upload or create may have happened, unjournaled); a
        ``fresh`` one cannot have either, and lists nothing."""
        if entry.job_id is not None:
            return
        if entry.file_id is None and not fresh:
            entry.file_id = await api.find_file(client, entry.name, entry.intent_at)
        if entry.file_id is None:
            where = self._where()
            data = b"".join(self.lines[where[cid]] for cid in entry.rows if cid in where)
            entry.file_id = await api.upload(client, data, entry.name)
            fresh = True  # just uploaded: no job can exist for it yet
        self.journal.save()
        batch = None if fresh else await api.find_job(client, entry.file_id, entry.intent_at)
        if batch is None:
            batch = await api.create(client, entry.file_id, self.adapter, entry.name)
        entry.job_id, entry.status = str(batch.id), str(batch.status)
        entry.created_at = float(batch.created_at)
        self.journal.save()
        self.view.show(self.journal.files.index(entry), entry, batch)

    async def _poll(self, client: Any, live: list[FileEntry]) -> None:
        wait = self.adapter.limits.poll_s
        while (live or self._waiting) and not self._stopping.is_set():
            ended, refused = 0, []
            for entry in list(live):
                batch = await self._retrieve(client, entry)
                if batch is None:
                    continue  # a passing failure: ask again at the next round
                self.view.show(self.journal.files.index(entry), entry, batch)
                if batch.status in api.TERMINAL:
                    await self._collect(client, entry, batch)
                    live.remove(entry)
                    ended += 1
                    if _over_token_limit(batch):
                        refused.append(entry)
                    wait = self.adapter.limits.poll_s
            # a file refused for the queue's token limit goes again while other jobs of the
            # run hold the queue, or ended in this round (whichever of them was seen first)
            if refused and (live or ended > len(refused)):
                where = self._where()
                for entry in reversed(refused):
                    self._waiting.appendleft([where[c] for c in entry.rows if c in where])
            await self._fill(client, live)
            if live:
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=wait)
                except TimeoutError:
                    wait = self.adapter.limits.next_poll(wait)

    async def _retrieve(self, client: Any, entry: FileEntry) -> Any:
        """The job's state, or None after a passing failure (connection, 429, 5xx); the
        ``_MAX_MISSES``-th one in a row is raised."""
        try:
            batch = await client.batches.retrieve(entry.job_id)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            passing = status is None or status == 429 or status >= 500
            self._misses += 1
            if not passing or self._misses >= _MAX_MISSES or not isinstance(exc, _transient()):
                raise
            return None
        self._misses = 0
        return batch

    async def _collect(self, client: Any, entry: FileEntry, batch: Any) -> None:
        found: dict[str, Answer] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            found.update(api.read_results(await api.download(client, file_id), self.adapter))
        index = self.journal.files.index(entry)
        answers = _stored(entry.rows, found, batch, index)
        entry.status, entry.finished_at = str(batch.status), time.time()
        self.journal.collected(entry, answers)
        failed = sum(1 for a in answers.values() if a.error is not None)
        elapsed = entry.finished_at - (entry.created_at or entry.finished_at)
        used = (sum(a.input_tokens for a in answers.values()),
                sum(a.output_tokens for a in answers.values()))
        self.view.emit(BatchFinished(
            asyncio.get_running_loop().time(), index, 0, 0, len(entry.rows), 0, elapsed,
            len(entry.rows) - failed, failed, *used))
        self.view.collected(index, *used)


def _stored(rows: list[str], found: dict[str, Answer], batch: Any,
            index: int) -> dict[str, Stored]:
    """What job ``index`` (``batch``) answered for each of its ``rows``, as journal records:
    a value, a per-row error, or (no line for it) a resumable ``batch_<status>`` error."""
    why = f"batch_{batch.status}: job {batch.id} gave no answer for this row; rerun to resubmit"
    if batch.status == "failed" and batch.errors is not None and batch.errors.data:
        why = f"batch_failed: {batch.errors.data[0].message}; rerun to resubmit"
    answers: dict[str, Stored] = {}
    for cid in rows:
        got = found.get(cid)
        if got is None:
            answers[cid] = Stored(error=why, resumable=True, file=index)
        elif isinstance(got.value, RowError):
            answers[cid] = Stored(error=str(got.value), resumable=got.resumable, file=index)
        else:
            answers[cid] = Stored(got.value, None, False, got.input_tokens, got.output_tokens,
                                  index)
    return answers


def _over_token_limit(batch: Any) -> bool:
    """A job the provider failed because the model's enqueued tokens were over its limit."""
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    return batch.status == "failed" and any(
        getattr(e, "code", None) == "token_limit_exceeded" for e in data)


# -- the result frame ------------------------------------------------------------------------
def _result(run: _BatchRun) -> pl.DataFrame:
    """One row per input row: journaled answers as outputs / errors, the rest marked."""
    journal, job = run.journal, run.job
    n = len(run.ids)
    out = Outcomes(n)
    values: list[Any] = [None] * n
    answered: list[int] = []
    sent = {cid for e in journal.live() for cid in e.rows}
    for i, cid in enumerate(run.ids):
        got = journal.answers.get(cid)
        if got is None:
            out.errors[i] = _STILL_RUNNING if cid in sent else _NOT_SENT
            continue
        entry = journal.files[got.file] if 0 <= got.file < len(journal.files) else None
        out.done[i] = True
        out.attempts[i] = 1
        out.errors[i] = got.error
        out.run_batch[i] = max(got.file, 0)
        if entry is not None and entry.created_at is not None:
            out.started[i] = entry.created_at
            out.elapsed[i] = (entry.finished_at or entry.created_at) - entry.created_at
        values[i] = got.value
        answered.append(i)
    if answered:
        column = pl.Series(job.cfg.columns.output, [values[i] for i in answered],
                           dtype=run.adapter.dtype, strict=False)
        out.pieces.append((np.asarray(answered, dtype=np.int64), column.to_frame()))
    waiting = sum(1 for e in out.errors if e in (_STILL_RUNNING, _NOT_SENT))
    if waiting:
        msg = (f"{waiting} of {n} rows are in batch jobs still running or not submitted; "
               "rerun with the same settings to collect / submit them")
        warnings.warn(msg, PartialResultWarning, stacklevel=4)
    return assemble(job.planned, out, job.cfg.columns, job.cfg.output_dtype)
