"""One run's use of the response cache: the row keys and the three hooks the run calls.

``open_cache`` resolves ``process(..., cache=...)`` into a ``CacheRun``; like the checkpoint's
``Journal`` it has ``restrict`` (drop the rows whose answer is cached before the pool is
built), ``record`` (the pool's ``on_batch_done``: queue the batch's answers for the writer
thread, so a crash loses at most what is being written) and ``merge`` (the cached rows back
into the run's outcomes, ``attempts = 0``), then ``close`` (wait for the writes).

**Key** of a row: a 128-bit hash of (fn's identity, the output column names and type, the names
and types of the input columns, the row's values in them). fn's identity is the run
fingerprint's (``dfbatch.persist._fingerprint.fn_identity``: its code and captured values, or
the ``dfbatch_fingerprint`` an adapter declares: model, prompt, system, sampling parameters).
The input columns are ``cache_key=`` if given, else the columns an adapter reads
(``fn.dfbatch_inputs``: a chat prompt's template fields, an embedding's text column), else
every column but the plan's. Values are hashed as sent (after ``oversize="truncate"``), so
batch sizes, agents, limits and token settings never change a key. Row hashes are polars'
``hash_rows`` (stable within a polars version: after an upgrade old entries miss and age out),
with floats hashed as their bits: ``-0.0`` and ``0.0``, or two NaNs, are values a fn can tell
apart (``str``, ``math.copysign``), so they never share an answer (null is apart from NaN).

Rows that ended in an error are not cached unless ``cache_errors=True``; ``cache="refresh"``
looks nothing up, calls every row and overwrites the stored answers. Rows that are never sent
(null or empty texts without ``send_null=True``) are neither looked up nor stored: they end
in their ``null_text`` error, as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import CheckpointWarning, ConfigError, did_you_mean
from dfbatch.execute._recorder import Outcomes
from dfbatch.execute._scheduler import Batch, Batches, narrow
from dfbatch.persist._cache import Cache
from dfbatch.persist._cache_codec import float_bits
from dfbatch.persist._fingerprint import fn_identity
from dfbatch.plan._plan import NULL_TEXT

CacheArg = bool | str | os.PathLike[str] | Cache | None
_STOP = object()
CHUNK_SHARE = 16  # one chunk holds at most max_size / 16 (a backlog must not evict itself)


def as_cache(cache: CacheArg) -> tuple[Cache | None, bool]:
    """The ``Cache`` a ``cache=`` argument names, and whether it is ``"refresh"``."""
    if cache is None or cache is False:
        return None, False
    if cache is True:
        return Cache(), False
    if isinstance(cache, str) and cache == "refresh":
        return Cache(refresh=True), True
    if isinstance(cache, Cache):
        return cache, cache.refresh
    if isinstance(cache, (str, os.PathLike)):
        return Cache(cache), False
    msg = (f"cache must be True, 'refresh', a file path or dfbatch.Cache(...), got {cache!r}")
    raise ConfigError(msg)


def open_cache(
    cache: CacheArg, fn: Callable[..., Any], text: str | pl.Expr, cfg: BatchConfig, *,
    cache_key: Sequence[str] | None = None, cache_errors: bool = False,
) -> CacheRun | None:
    """A ``CacheRun`` for ``cache=`` (None without a cache, after checking the options)."""
    store, is_refresh = as_cache(cache)
    if store is None:
        if cache_key is not None or cache_errors:
            msg = "cache_key / cache_errors only apply with cache=; pass cache=True too"
            raise ConfigError(msg)
        return None
    return CacheRun(store, namespace(fn, text, cfg), _inputs(fn, cache_key), cfg,
                    cache_errors=cache_errors, refresh=is_refresh)


def check_cached_column(frame: pl.DataFrame, cfg: BatchConfig) -> None:
    """The result's ``cached`` column must not overwrite an input column."""
    name = cfg.columns.cached
    if name in frame.columns:
        msg = (f"the input already has a column {name!r}, which cache= adds to the result; "
               f"drop it, or rename the added one with columns=dfbatch.Columns(cached='...')")
        raise ConfigError(msg)


def namespace(fn: Callable[..., Any], text: str | pl.Expr, cfg: BatchConfig) -> dict[str, Any]:
    """What besides the row's values decides fn's answer (ConfigError if fn is unknowable)."""
    ident = fn_identity(fn)
    if "unsure" in ident:
        msg = (f"cache=: cannot tell what fn {ident['name']} is ({ident['unsure']}), so its "
               "answers cannot be reused safely. Declare what identifies fn, e.g. "
               "fn.dfbatch_fingerprint = {'version': 1} (change it whenever fn changes what it "
               "returns), or run without cache=")
        raise ConfigError(msg)
    return {"fn": ident, "output": cfg.columns.output,
            "output_dtype": None if cfg.output_dtype is None else str(cfg.output_dtype)}


def _inputs(fn: Callable[..., Any], cache_key: Sequence[str] | None) -> tuple[str, ...] | None:
    if cache_key is not None:
        if isinstance(cache_key, str) or not all(isinstance(c, str) for c in cache_key):
            msg = f"cache_key must be a list of column names, got {cache_key!r}"
            raise ConfigError(msg)
        return tuple(cache_key)
    declared = getattr(fn, "dfbatch_inputs", None)
    return tuple(declared) if declared else None


def row_keys(frame: pl.DataFrame, ns: dict[str, Any], inputs: tuple[str, ...] | None,
             cfg: BatchConfig, *, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 arrays: each row's 128-bit cache key."""
    if inputs is None:
        cols = [c for c in frame.columns if c not in cfg.columns.plan_names()]
    else:
        missing = [c for c in inputs if c not in frame.columns]
        if missing and strict:
            hint = did_you_mean(missing[0], frame.columns)
            msg = f"cache key column {missing[0]!r} not found (cache_key= or fn's inputs).{hint}"
            raise ConfigError(msg)
        cols = [c for c in inputs if c in frame.columns]
    sub = frame.select(cols)
    described: dict[str, Any] = {**ns, "columns": [[c, str(t)] for c, t in sub.schema.items()]}
    bits = float_bits(sub)
    if bits is not None:  # floats keyed by their bits: -0.0 is not 0.0, NaNs differ
        sub, described["floats"] = bits, "bits"  # (a new key: entries keyed before miss)
    head = json.dumps(described, sort_keys=True, default=str)
    d = hashlib.blake2b(head.encode(), digest_size=16).digest()
    p1, p2 = (np.frombuffer(d[:8], np.uint64)[0], np.frombuffer(d[8:], np.uint64)[0])
    if frame.height == 0 or not cols:
        n = frame.height
        return np.full(n, p1, np.uint64), np.full(n, p2, np.uint64)
    try:
        k1 = sub.hash_rows(seed=0x5EED).to_numpy()
        k2 = sub.hash_rows(seed=0xCAC4E).to_numpy()
    except pl.exceptions.PolarsError as exc:
        msg = f"cache=: cannot hash the input rows ({exc}); pass cache_key=[<columns>]"
        raise ConfigError(msg) from None
    return k1 ^ p1, k2 ^ p2


def cached_rows(frame: pl.DataFrame, fn: Callable[..., Any], text: str | pl.Expr,
                cfg: BatchConfig, cache: CacheArg, cache_key: Sequence[str] | None = None,
                *, cache_errors: bool = False) -> np.ndarray:
    """A boolean mask: the rows of ``frame`` (as sent) that a run with these ``cache=``,
    ``cache_key=`` and ``cache_errors=`` takes from the cache (for summaries)."""
    store, refresh = as_cache(cache)
    mask = np.zeros(frame.height, bool)
    if store is None or refresh or frame.height == 0:
        return mask
    k1, k2 = row_keys(frame, namespace(fn, text, cfg), _inputs(fn, cache_key), cfg, strict=True)
    with store:
        hits, _, _ = _find(store, k1, k2, _sent_rows(frame, cfg), errors=cache_errors,
                           touch=False, values=False)
    mask[hits] = True
    return mask


def _sent_rows(frame: pl.DataFrame, cfg: BatchConfig) -> np.ndarray | None:
    """The positions of the rows the run sends (None: every row): not the ``null_text`` rows,
    unless ``send_null=True``."""
    flag = cfg.columns.flag
    if cfg.send_null or flag not in frame.columns:
        return None
    null = (frame[flag] == NULL_TEXT).fill_null(False).to_numpy()
    return np.flatnonzero(~null) if null.any() else None


def _find(store: Cache, k1: np.ndarray, k2: np.ndarray, rows: np.ndarray | None, *,
          errors: bool, touch: bool = True, values: bool = True,
          ) -> tuple[np.ndarray, list[tuple[np.ndarray, Any]], dict[int, str]]:
    """``store.lookup`` of the keys at ``rows`` (None: all), positions those of all keys."""
    if rows is None:
        return store.lookup(k1, k2, errors=errors, touch=touch, values=values)
    hits, pieces, errs = store.lookup(k1[rows], k2[rows], errors=errors, touch=touch,
                                      values=values)
    return (rows[hits], [(rows[pos], table) for pos, table in pieces],
            {int(rows[i]): e for i, e in errs.items()})


class CacheRun:
    """The cache hooks of one run (``restrict`` / ``record`` / ``merge`` / ``close``)."""

    def __init__(self, store: Cache, ns: dict[str, Any], inputs: tuple[str, ...] | None,
                 cfg: BatchConfig, *, cache_errors: bool, refresh: bool) -> None:
        self.store, self.ns, self.inputs, self.cfg = store, ns, inputs, cfg
        self.cache_errors, self.refresh = cache_errors, refresh
        self.n = 0
        self.k1 = self.k2 = np.zeros(0, np.uint64)
        self.todo = np.zeros(0, np.int64)
        # the pool's run position -> position in the frame it was given (None: the same)
        self.order: np.ndarray | None = None
        self.hits = np.zeros(0, np.int64)
        self._pieces: list[tuple[np.ndarray, Any]] = []
        self._errs: dict[int, str] = {}
        self._seen = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        self._looked: pl.DataFrame | None = None  # the frame ``lookup`` last keyed

    def lookup(self, frame: pl.DataFrame) -> np.ndarray:
        """Key ``frame``'s rows and find the cached ones (positions); nothing under refresh."""
        self.n, self._looked = frame.height, frame
        self.k1, self.k2 = row_keys(frame, self.ns, self.inputs, self.cfg, strict=True)
        if self.refresh or self.n == 0:
            self.hits = np.zeros(0, np.int64)
        else:
            try:
                self.hits, self._pieces, self._errs = _find(
                    self.store, self.k1, self.k2, _sent_rows(frame, self.cfg),
                    errors=self.cache_errors)
            finally:
                self.store.close()  # (this thread's connection: often a pool's worker)
        mask = np.ones(self.n, bool)
        mask[self.hits] = False
        self.todo = np.flatnonzero(mask)
        return self.hits

    def restrict(
        self, frame: pl.DataFrame, batches: Batches, row_tokens: np.ndarray,
        row_bytes: np.ndarray,
    ) -> tuple[pl.DataFrame, Batches, np.ndarray, np.ndarray]:
        """The frame, batches, tokens and bytes of the rows not cached (rows renumbered).

        ``frame`` is looked up unless ``lookup`` was already called with it (a stream looks a
        chunk up in its reader thread, off the event loop)."""
        if self._looked is not frame:
            self.lookup(frame)
        self._start()
        if len(self.todo) == self.n:
            return frame, batches, row_tokens, row_bytes
        tokens, nbytes = row_tokens[self.todo], row_bytes[self.todo]
        out = narrow(batches, self.todo, self.n, tokens, nbytes, self.cfg)
        return frame[self.todo], out, tokens, nbytes

    def record(self, batch: Batch, out: Outcomes) -> None:
        """``on_batch_done`` hook: queue the batch's answers (and errors if asked) for writing."""
        if self.failure is not None or batch.reject is not None:
            return  # (rows refused unsent, null texts: fn never saw them)
        local = batch.rows
        pos = self.todo[local if self.order is None else self.order[local]]
        errors = [out.errors[i] for i in local.tolist()]
        keep = np.array([e is None or self.cache_errors for e in errors], bool)
        if not keep.any():
            return
        frame, self._seen = out.output_of(batch.rows, self._seen)
        self._queue.put((pos[keep], frame if frame is None else frame.filter(pl.Series(keep)),
                         [e for e, k in zip(errors, keep.tolist(), strict=True) if k]))

    def merge(self, sub: Outcomes) -> Outcomes:
        """Outcomes of every row: the cached ones (``attempts = 0``) plus the pool's (``sub``)."""
        if len(self.todo) == self.n:
            return sub
        out = sub.placed(self.n, self.todo)
        out.done[self.hits] = True
        for i, e in self._errs.items():
            out.errors[i] = e
        out.pieces[:0] = [(rows, pl.DataFrame(pl.from_arrow(table)))  # (cached first)
                          for rows, table in self._pieces]
        self._pieces = []  # decoded once
        return out

    def answers(self) -> tuple[np.ndarray, list[tuple[np.ndarray, Any]], dict[int, str]]:
        """The hits (positions), their outputs [(positions, Arrow table)] and errors."""
        return self.hits, self._pieces, self._errs

    def cached_mask(self) -> np.ndarray:
        mask = np.zeros(self.n, bool)
        mask[self.hits] = True
        return mask

    # -- the writer thread -------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="dfbatch-cache",
                                            daemon=True)
            self._thread.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            items = [item]
            while not self._queue.empty():  # several batches in one transaction
                more = self._queue.get()
                if more is _STOP:
                    self._queue.put(_STOP)
                    break
                items.append(more)
            if self.failure is None:
                try:
                    self._write(items)
                except Exception as exc:  # the run goes on; close() warns
                    self.failure = f"{type(exc).__name__}: {exc}"
        self.store.close()

    def _write(self, items: list[tuple[np.ndarray, pl.DataFrame | None, list[str | None]]]
               ) -> None:
        """Store queued batches, those with the same output schema as one chunk of at most
        ``max_size / CHUNK_SHARE`` bytes: a backlog (a loaded machine) written as one chunk
        over ``max_size`` would be evicted whole, the newest answers with it."""
        groups: list[list[tuple[np.ndarray, pl.DataFrame | None, list[str | None]]]] = []
        cap = self.store.max_size / CHUNK_SHARE if self.store.max_size else float("inf")
        held = 0.0  # (estimated bytes of the last group)
        for item in items:
            frame = item[1]
            last = groups[-1][0][1] if groups else None
            size = frame.estimated_size() if frame is not None else 0
            if (groups and frame is not None and last is not None
                    and last.schema == frame.schema and held + size <= cap):
                groups[-1].append(item)
                held += size
            else:
                groups.append([item])
                held = size
        for group in groups:
            pos = np.concatenate([g[0] for g in group])
            errors = [e for g in group for e in g[2]]
            first = group[0][1]
            table = None if first is None or first.width == 0 else pl.concat(
                [g[1] for g in group if g[1] is not None]).to_arrow()
            self.store.store(self.k1[pos], self.k2[pos], table, errors, overwrite=self.refresh)

    def close(self) -> None:
        """Wait for the queued writes; warn if caching stopped during the run."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self.failure is not None:
            msg = (f"cache {str(self.store.path)!r}: writing stopped during the run "
                   f"({self.failure}); the run's result is complete, but a rerun will call "
                   "fn again for the answers not written")
            self.failure = None
            warnings.warn(msg, CheckpointWarning, stacklevel=3)
