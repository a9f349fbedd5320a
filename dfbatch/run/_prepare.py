"""Prepare a run: validate fn and settings, plan the frame unless it is planned, truncate
oversize texts, and group the plan's rows into per-agent lists of ``Batch``; then execute it.

``_Job`` is what ``process`` / ``aprocess`` and the streaming front end share.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig, Progress
from dfbatch.engines import select
from dfbatch.errors import (
    ColumnError,
    ConfigError,
    PartialResultWarning,
    ReplanWarning,
    RunStoppedError,
    warn_user,
)
from dfbatch.events import Event, RunFinished, RunStarted, StatsAccumulator
from dfbatch.execute._batches import CALL_ANYWAY, FROZEN, Batch, Batches
from dfbatch.execute._caller import LOCAL, CallerFactory
from dfbatch.execute._loop import mark_run, unmark_run
from dfbatch.execute._pool import Outcomes, Pool
from dfbatch.execute._result import assemble, attach_partial
from dfbatch.execute._stack import RunLimits
from dfbatch.persist._cache_run import CacheRun
from dfbatch.persist._checkpoint import Journal
from dfbatch.plan._plan import NULL_TEXT
from dfbatch.run._checks import check_frame, check_rates
from dfbatch.run._wiring import open_display, safe, tick

Fn = Callable[[pl.DataFrame], Any]
_Left = tuple[pl.DataFrame, Batches, np.ndarray, np.ndarray]
_ROW_OVERHEAD_BYTES = 64
_DEFAULT_OUTPUT_TOKENS = BatchConfig().output_tokens_per_row
_NULL_ERROR = ("null_text: the text is null or empty, so it was not sent; pass send_null=True "
               "to send it")


@dataclass
class _Job:
    fn: Fn
    cfg: BatchConfig
    planned: pl.DataFrame
    send: pl.DataFrame  # what fn sees (texts truncated under oversize="truncate")
    batches: Batches
    row_tokens: np.ndarray
    row_bytes: np.ndarray
    pool: Pool | None = None
    journal: Journal | None = None  # checkpoint=: skip journaled rows, journal finished ones
    engine: CallerFactory = LOCAL  # how batches are called (Ray actors under engine="ray")
    cache: CacheRun | None = None  # cache=: skip cached rows, write new answers as they arrive

    @classmethod
    def prepare(
        cls, df: Any, fn: Fn, text: str | pl.Expr, config: BatchConfig | None, settings: Any,
        engine: str = "asyncio", ray_address: str | None = None,
    ) -> _Job:
        """Validate fn and the settings, resolve the config, plan ``df``."""
        cfg, chosen = resolve(fn, config, settings, engine, ray_address)
        asked = frozenset(settings) | _set_in(config)
        return cls.with_config(df, fn, text, cfg, chosen, asked=asked)

    @classmethod
    def with_config(cls, df: Any, fn: Fn, text: str | pl.Expr, cfg: BatchConfig,
                    engine: CallerFactory = LOCAL, asked: frozenset[str] = frozenset()) -> _Job:
        """Plan ``df`` under a config ``resolve`` made (a stream's chunks share one)."""
        if isinstance(df, pl.LazyFrame):
            df = df.collect()
        if not isinstance(df, pl.DataFrame):
            msg = f"df must be a polars DataFrame or LazyFrame, got {type(df).__name__}"
            raise ConfigError(msg)
        check_frame(df, cfg)  # clashing or damaged columns fail before any call
        planned = _planned(df, text, cfg, asked)
        send, row_tokens = _to_send(planned, text, cfg)
        row_bytes = _row_bytes(planned, text)
        row_tokens, row_bytes = _narrowed(row_tokens), _narrowed(row_bytes)
        batches = _batches(planned, row_tokens, row_bytes, cfg)
        check_rates(fn, cfg, row_tokens, batches)  # a tpm= no request fits, before any call
        return cls(fn, cfg, planned, send, batches, row_tokens, row_bytes, engine=engine)

    def limits(self) -> RunLimits:
        """The run's limit stack (a stream builds it once and shares it by every chunk)."""
        return RunLimits.from_config(self.cfg, self.batches.n_agents,
                                     rates_elsewhere=self.engine.rates_elsewhere)

    def narrow(self) -> _Left:
        """The frame, batches, tokens and bytes of the rows neither journaled nor cached.

        Reads the journal and looks every row up in the cache: ``execute`` runs it in a
        worker thread, so a lookup of a million rows never holds the event loop."""
        frame, batches, tokens, nbytes = self.send, self.batches, self.row_tokens, self.row_bytes
        if self.journal is not None:
            frame, batches, tokens, nbytes = self.journal.restrict(frame, batches, tokens, nbytes)
        if self.cache is not None:  # then the cached rows (the driver's work under ray)
            frame, batches, tokens, nbytes = self.cache.restrict(frame, batches, tokens, nbytes)
            if self.journal is not None:  # cached rows are journaled like answered ones
                self.journal.inner = self.cache.todo
                self.journal.record_cached(*self.cache.answers())
        return frame, batches, tokens, nbytes

    def pool_for(self, emit: Callable[[Event], None] | None, limits: RunLimits | None = None,
                 left: _Left | None = None) -> Pool:
        """The pool that runs what is left of this job (``left``: ``narrow()``'s answer)."""
        reserved = set(self.planned.columns) | set(self.cfg.columns.result_names())
        frame, batches, tokens, nbytes = left if left is not None else self.narrow()
        hooks = [h.record for h in (self.journal, self.cache) if h is not None]
        self.pool = Pool(
            self.fn, frame, batches, self.cfg, row_tokens=tokens, row_bytes=nbytes, emit=emit,
            reserved=reserved, limits=limits or self.limits(), engine=self.engine,
            on_batch_done=_chain(hooks),
        )
        for hook in (self.journal, self.cache):  # the pool runs rows in batch order: map back
            if hook is not None:
                hook.order = self.pool.order
        return self.pool

    def merge(self, outcomes: Outcomes) -> Outcomes:
        """The pool's outcomes plus the rows the cache and the checkpoint already held."""
        if self.cache is not None:
            outcomes = self.cache.merge(outcomes)
        if self.journal is not None:
            outcomes = self.journal.merge(outcomes)
        return outcomes

    def finish(self, result: pl.DataFrame) -> pl.DataFrame:
        """Under cache=: the result with the ``cached`` column (True: taken from the cache)."""
        if self.cache is None:
            return result
        mask = self.cache.cached_mask()
        if self.journal is not None:
            full = np.zeros(result.height, bool)
            full[self.journal.todo[mask]] = True
            mask = full
        return result.with_columns(pl.Series(self.cfg.columns.cached, mask, dtype=pl.Boolean))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.cache is not None:
            self.cache.close()

    def stop(self) -> None:
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

        narrowing = asyncio.ensure_future(asyncio.to_thread(self.narrow))
        try:
            left = await asyncio.shield(narrowing)
        except BaseException:  # Ctrl-C while the journal and cache are read: the thread
            await asyncio.wait([narrowing])  # cannot be stopped; release them once it is done
            raise  # (aprocess closes them)
        pool = self.pool_for(emit, left=left)
        c = self.cfg.columns
        per_agent = tuple(pool.sched.queued_load)  # request tokens, as done
        hits = len(self.cache.hits) if self.cache is not None else 0
        before = self.planned.height - pool.frame.height - hits  # done by an earlier run
        if before and progress is not False:
            print(f"resuming: {before:,} of {self.planned.height:,} rows already done",
                  file=sys.stderr, flush=True)
        emit(RunStarted(loop.time(), pool.frame.height, pool.sched.pending, sum(per_agent),
                        per_agent, cached_rows=hits, rows_before=before, rpm=self.cfg.rpm,
                        tpm=self.cfg.tpm))
        display = open_display(progress, pool.frame.height, pool.stop if stoppable else None)
        # the live view counts each batch from its fields; only on_event gets batch events
        # (nobody listens: the hot path builds none)
        pool.recorder.listen(acc if display is not None else None, on_event)
        ticker = asyncio.create_task(tick(display, acc)) if display is not None else None
        in_run = mark_run()  # a blocking process() in fn runs on its own loop (execute._loop)
        try:
            outcomes = await pool.run()
        except BaseException as exc:  # paid answers are never lost: exc.partial holds them
            attach_partial(exc, self.planned, pool.out, c, self.cfg.output_dtype, self.merge)
            raise
        finally:
            unmark_run(in_run)
            pool.limits.close()  # (their timers: none fires after the run)
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            unfinished = pool.cancelled_rows
            emit(RunFinished(loop.time(), cancelled=unfinished > 0))
            if display is not None:
                safe(display.close, acc.snapshot())
            self.close()
        self._spent(pool)
        if pool.fatal is not None:
            partial = self.finish(assemble(self.planned, self.merge(outcomes), c, consume=True))
            raise RunStoppedError(pool.fatal, partial=partial)
        if unfinished:
            msg = (
                f"run stopped: {unfinished} of {self.planned.height} rows unfinished "
                "(error='cancelled'); their outputs are null"
            )
            warn_user(msg, PartialResultWarning)
        return self.finish(assemble(self.planned, self.merge(outcomes), c, self.cfg.output_dtype,
                                    consume=True))


    def _spent(self, pool: Pool) -> None:
        """The run is over: drop what only it needed (its batches, per-row tokens and bytes)
        before the result is built, so the two never take memory at once."""
        pool.sched.release()
        self.batches = Batches.of([[] for _ in range(self.batches.n_agents)])
        self.row_tokens = np.zeros(0, self.row_tokens.dtype)  # (not a view: that keeps it)
        self.row_bytes = np.zeros(0, self.row_bytes.dtype)


def _chain(hooks: Sequence[Callable[[Batch, Outcomes], None]]
           ) -> Callable[[Batch, Outcomes], None] | None:
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def both(batch: Batch, out: Outcomes) -> None:
        for hook in hooks:
            hook(batch, out)

    return both


def resolve(
    fn: Fn, config: BatchConfig | None, settings: Any, engine: str = "asyncio",
    ray_address: str | None = None,
) -> tuple[BatchConfig, CallerFactory]:
    """The run's config and engine. An adapter's ``dfbatch_output_tokens`` fills in
    ``output_tokens_per_row`` unless the user set it (keyword, or ``config=`` with a value other
    than the default)."""
    if not callable(fn):
        msg = f"fn must be a callable taking one batch (a pl.DataFrame), got {fn!r}"
        raise ConfigError(msg)
    cfg = BatchConfig.from_kwargs(config, **settings)
    chosen, cfg = select(engine, cfg, ray_address, fn)
    expected_out = getattr(fn, "dfbatch_output_tokens", None)
    user_set = "output_tokens_per_row" in settings or (
        config is not None and config.output_tokens_per_row != _DEFAULT_OUTPUT_TOKENS)
    if isinstance(expected_out, int) and not user_set:
        cfg = cfg.replace(output_tokens_per_row=expected_out)
    return cfg, chosen


def sent_frame(df: pl.DataFrame, fn: Fn, text: str | pl.Expr, config: BatchConfig | None,
               settings: dict[str, Any]) -> tuple[pl.DataFrame, BatchConfig]:
    """What ``process(df, fn, text=text, config=config, **settings)`` would send (planned,
    texts truncated under ``oversize="truncate"``) and the run's config: the cache keys these
    rows, so ``summary(cache=)`` counts the hits the run will have."""
    cfg, _ = resolve(fn, config, settings)
    planned = _planned(df, text, cfg, frozenset(settings) | _set_in(config))
    return _to_send(planned, text, cfg)[0], cfg


def _planned(
    df: pl.DataFrame, text: str | pl.Expr, cfg: BatchConfig, asked: frozenset[str] = frozenset()
) -> pl.DataFrame:
    """``df`` planned. A planned frame runs as planned, unless plan settings passed to
    ``process`` make another plan: then it is re-planned (a ``ReplanWarning`` says so), or,
    when its text is not there to re-plan, refused with the plan in force."""
    from dfbatch.plan import plan

    names = cfg.columns.plan_names()
    if not all(x in df.columns for x in names):
        return plan(df, text, config=cfg)
    if not asked & _PLAN_FIELDS:
        return df  # already planned: run as planned
    base = df.drop(names)
    try:
        fresh = plan(base, text, config=cfg)
    except ColumnError as e:
        msg = (f"this frame is already planned ({_describe(df, cfg)}) and its text is not here "
               f"to re-plan under {_asked(asked)}; drop the plan columns ({names}) and pass "
               "text=, or run without those settings")
        raise ConfigError(msg) from e
    if fresh.select(names).equals(df.select(names)):
        return df
    msg = (f"the frame's plan ({_describe(df, cfg)}) was made with other settings than "
           f"{_asked(asked)}; re-planned: {_describe(fresh, cfg)}. To keep a plan, pass no plan "
           "settings to process (or plan with them: df.batch.plan(...))")
    warn_user(msg, ReplanWarning)
    return fresh


_PLAN_FIELDS = frozenset({"items_per_batch", "token_limit", "agents", "agents_per_core",
                          "encoding", "request_overhead_tokens", "output_tokens_per_row"})


def _set_in(config: BatchConfig | None) -> frozenset[str]:
    """The plan fields ``config`` sets to a value other than the default."""
    if config is None:
        return frozenset()
    default = BatchConfig()
    return frozenset(f for f in _PLAN_FIELDS if getattr(config, f) != getattr(default, f))


def _asked(asked: frozenset[str]) -> str:
    return ", ".join(sorted(asked & _PLAN_FIELDS))


def _describe(planned: pl.DataFrame, cfg: BatchConfig) -> str:
    c = cfg.columns
    per = planned.group_by(c.batch_id).len()["len"]
    return (f"{per.len():,} batches of up to {int(per.max() or 0)} rows over "  # type: ignore[arg-type]
            f"{planned[c.agent_id].n_unique():,} agents")


def _text_name(text: str | pl.Expr) -> str | None:
    return text if isinstance(text, str) else None


def _to_send(
    planned: pl.DataFrame, text: str | pl.Expr, cfg: BatchConfig
) -> tuple[pl.DataFrame, np.ndarray]:
    c = cfg.columns
    tokens = _narrowed(planned[c.n_tokens].to_numpy())
    over = _oversize_rows(tokens, cfg)
    if cfg.oversize != "truncate" or not over.any():
        return planned, tokens
    name = _text_name(text)
    if name is None or name not in planned.columns:
        msg = "oversize='truncate' needs text= to name a column of the frame"
        raise ConfigError(msg)
    from dfbatch.plan._tokens import truncate

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
    # (the row's own tokens against what is left: no array of the sums)
    return tokens > cfg.token_limit - cfg.request_overhead_tokens - cfg.output_tokens_per_row


def _batches(
    planned: pl.DataFrame, tokens: np.ndarray, row_bytes: np.ndarray, cfg: BatchConfig
) -> Batches:
    """Group row positions by planned batch (vectorized) into per-agent queues of batches
    (``Batches``: columns, no object per batch)."""
    c = cfg.columns
    n_agents = cfg.n_agents
    if planned.height == 0:
        return Batches.of([[] for _ in range(n_agents)])
    bid = planned[c.batch_id].to_numpy()
    null = np.zeros(len(bid), bool) if cfg.send_null else (
        planned[c.flag] == NULL_TEXT).fill_null(False).to_numpy()
    if null.any():  # a planned batch's null rows: a batch of their own
        bid = bid.astype(np.int64)
        bid = np.where(null, bid.max() + 1 + bid, bid)
    ordered = bool((bid[1:] >= bid[:-1]).all())  # planned in order: no sort, no reordering
    order = None if ordered else np.argsort(bid, kind="stable")
    sorted_bid = bid if order is None else bid[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_bid[1:] != sorted_bid[:-1]]))
    ids = sorted_bid[starts].astype(np.int64)
    del sorted_bid
    first = starts if order is None else order[starts]
    aid = planned[c.agent_id].to_numpy()
    n_agents = max(min(n_agents, len(ids)), int(aid.max()) + 1)  # no agent without work
    counts = np.diff(np.append(starts, len(bid)))
    btok = _sums(tokens if order is None else tokens[order], starts)
    btok = btok + cfg.request_overhead_tokens + cfg.output_tokens_per_row * counts
    nbytes = _sums(row_bytes if order is None else row_bytes[order], starts)
    agents = aid[first]  # (UInt16: the plan's agent ids)
    rejected = null[first]
    flags = (FROZEN * rejected + CALL_ANYWAY * ((cfg.oversize == "call") & (counts == 1))).astype(
        np.uint8)
    bounds = np.append(starts, len(bid)).astype(np.int64)
    reject = None
    if rejected.any():  # one text for every batch of null rows
        reject = np.full(len(ids), None, object)
        reject[rejected] = _NULL_ERROR
    return Batches(n_agents, agents, _narrowed(ids), agents, _narrowed(btok), _narrowed(nbytes),
                   flags, _narrowed(bounds), order, reject)


def _narrowed(a: np.ndarray) -> np.ndarray:
    """``a`` (integers) as int32 where every value fits, else int64: half the memory of a
    per-row array held for the whole run (sums of it are still taken as int64)."""
    if a.dtype == np.int32:
        return a
    if a.dtype.kind not in "iu":
        a = a.astype(np.int64)
    if len(a) and (int(a.max()) >= 2**31 or int(a.min()) < -(2**31)):
        return a.astype(np.int64, copy=False)
    return a.astype(np.int32)


def _sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The sums of ``values[starts[i]:starts[i+1]]`` (the last to the end), as int64;
    ``starts`` increasing. A block of batches at a time: ``reduceat`` would cast all of
    ``values`` to int64 at once."""
    out = np.empty(len(starts), np.int64)
    step = 1 << 14
    for i in range(0, len(starts), step):
        j = min(i + step, len(starts))
        lo, hi = int(starts[i]), int(starts[j]) if j < len(starts) else len(values)
        out[i:j] = np.add.reduceat(values[lo:hi], starts[i:j] - lo, dtype=np.int64)
    return out


def _row_bytes(planned: pl.DataFrame, text: str | pl.Expr) -> np.ndarray:
    name = _text_name(text)
    if name is not None and name in planned.columns and planned[name].dtype == pl.Utf8:
        sizes = planned[name].str.len_bytes().fill_null(0).to_numpy()  # (UInt32)
        extra = _ROW_OVERHEAD_BYTES * planned.width
        if len(sizes) and int(sizes.max()) + extra >= 2**31:
            return sizes.astype(np.int64) + extra
        out = sizes.astype(np.int32)
        out += extra
        return out
    return _narrowed(np.full(planned.height, _ROW_OVERHEAD_BYTES * planned.width, np.int64))
