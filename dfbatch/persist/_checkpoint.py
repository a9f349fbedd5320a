"""The resume journal: finished batches are journaled to a directory so a rerun skips their rows.

``process(df, fn, checkpoint="runs/sum")`` writes every batch that ends (outputs or an error) as
one Arrow IPC *part* file, and a rerun with the same directory calls ``fn`` only for the rows
that are not in the journal. The layout::

    runs/sum/
      manifest.json                  the run's fingerprint (rows, fn, config), digest, checksum
      lock                           held (flock) by the process that writes the journal
      parts/<digest>-00000007-<blake2b>.arrow   one finished batch (after a run: all, compacted)
      parts/.<digest>-00000008.arrow.tmp        being written: invisible until renamed

**Atomic, checksummed parts.** A part is written under a temporary name and renamed (atomic on
POSIX) to a name that carries the checksum of its bytes, so a crash leaves a complete part or an
ignored ``.tmp`` file, and a part is read only after its bytes match its checksum; a part that
does not (flipped bits, truncation) is set aside with a ``CheckpointWarning`` and its rows are
redone. Parts are only ever added; a compacted part is written before the parts it replaces are
deleted, and rows found twice are deduplicated (the newest wins), so each row is in the result
exactly once. A damaged manifest is a ``CheckpointError`` (pass ``resume='overwrite'``). Nothing
executable is read back: the manifest is JSON, parts are Arrow data. Parts are encoded and
written by a writer thread, off the event loop, in order; ``close`` waits for them.

**Journaling can stop, the run does not.** When a write fails (directory removed, disk full)
journaling stops, the run finishes in memory and returns everything, and ``close`` warns
(``CheckpointWarning``) with the reason. Outputs a checkpoint cannot store (Python objects:
Polars ``Object`` columns) are a ``CheckpointError`` at the first batch that returns them,
never pointer bytes written to disk.

**Fingerprint.** A run is identified by its input rows, the fn's identity and the config that
changes outputs (see ``dfbatch.persist._fingerprint``). Another fingerprint is a
``CheckpointError`` that says what differs, unless ``resume="overwrite"``.

**Rows.** With ``key`` a journaled row is matched by its key (the input may be reordered);
without it by position and row hash. Rows that ended in error are kept unless
``retry_errors=True``; rows cancelled by Ctrl-C are never journaled, so they always run again.
Calls are at-least-once: a crash repeats at most the batches that were in flight.

Examples
--------
>>> import tempfile, polars as pl, dfbatch
>>> calls = []
>>> def fn(batch):
...     calls.append(batch.height)
...     return batch["text"].str.to_uppercase()
>>> df = pl.DataFrame({"text": ["a", "b", "c", "d", "e"]})
>>> ckpt = tempfile.mkdtemp()
>>> first = dfbatch.process(df, fn, checkpoint=ckpt, items_per_batch=2, progress=False)
>>> again = dfbatch.process(df, fn, checkpoint=ckpt, items_per_batch=2, progress=False)
>>> sorted(calls), again["output"].to_list()  # the rerun made no call
([1, 2, 2], ['A', 'B', 'C', 'D', 'E'])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import CheckpointError, CheckpointWarning, ConfigError, did_you_mean
from dfbatch.execute._outputs import declared
from dfbatch.execute._recorder import Outcomes
from dfbatch.execute._scheduler import Batch, Batches, narrow
from dfbatch.persist._fingerprint import callable_name as callable_name  # re-exported
from dfbatch.persist._fingerprint import fingerprint as fingerprint  # re-exported
from dfbatch.persist._fingerprint import fingerprint_of_ids, row_ids, unsure_error
from dfbatch.persist._fingerprint import fn_identity as fn_identity  # re-exported
from dfbatch.persist._store import (
    ATTEMPTS,
    ELAPSED,
    ERROR,
    HASH,
    KEY,
    META,
    ROW,
    RUN_AGENT,
    RUN_BATCH,
    STARTED,
    Store,
)

if TYPE_CHECKING:
    pass

Resume = Literal["auto", "overwrite"]

_ROW, _HASH, _KEY = ROW, HASH, KEY
_ERROR, _ATTEMPTS = ERROR, ATTEMPTS
_RUN_BATCH, _RUN_AGENT = RUN_BATCH, RUN_AGENT
_STARTED, _ELAPSED = STARTED, ELAPSED
_META = META
_POS = "__dfbatch_pos"


# -- the journal of one run ----------------------------------------------------------------
def open_journal(
    checkpoint: str | os.PathLike[str] | None, planned: pl.DataFrame, fn: Callable[..., Any],
    text: str | pl.Expr, cfg: BatchConfig, *, key: str | None = None, resume: Resume = "auto",
    retry_errors: bool = False,
) -> Journal | None:
    """``Journal.open`` when ``checkpoint`` is given; None (after checking the options) if not."""
    if checkpoint is not None:
        return Journal.open(checkpoint, planned, fn, text, cfg, key=key, resume=resume,
                            retry_errors=retry_errors)
    used = [n for n, v in (("key", key), ("retry_errors", retry_errors)) if v]
    if used or resume != "auto":
        names = ", ".join([*used, *(["resume"] if resume != "auto" else [])])
        msg = f"{names} only apply with checkpoint='<directory>'; pass checkpoint= too"
        raise ConfigError(msg)
    return None


class Journal:
    """An open checkpoint: which rows are done, the ``on_batch_done`` hook, the final merge.

    Use ``Journal.open(...)``; then ``restrict`` the batches to the rows still to do (this
    locks the directory), pass ``record`` as the pool's ``on_batch_done``, ``merge`` the pool's
    outcomes, and ``close`` (compacts the parts and unlocks).
    """

    def __init__(self, store: Store, planned: pl.DataFrame, ids: pl.Series, cfg: BatchConfig,
                 key: str | None, done: pl.DataFrame) -> None:
        self.store = store
        self.cfg = cfg
        self.key = key
        self.ids = ids
        self.hashes = ids.to_numpy() if key is None else None
        self.n = planned.height
        self.done = done  # journaled rows to keep, sorted by _POS
        self.closed = False
        self._seen = 0  # pieces of the pool's outcomes already journaled
        # with cache=, the pool runs only the uncached rows of ``todo``: its row i is todo
        # index inner[i] (``dfbatch.persist._cache_run``)
        self.inner: np.ndarray | None = None
        # the pool's run position -> position in the frame it was given (None: the same)
        self.order: np.ndarray | None = None
        done_pos = done[_POS].to_numpy().astype(np.int64)
        mask = np.ones(self.n, bool)
        mask[done_pos] = False
        self.todo = np.flatnonzero(mask)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], planned: pl.DataFrame, fn: Callable[..., Any],
        text: str | pl.Expr, cfg: BatchConfig, *, key: str | None = None,
        resume: Resume = "auto", retry_errors: bool = False,
    ) -> Journal:
        """Open (or create) the checkpoint at ``path`` for running ``fn`` over ``planned``."""
        if resume not in ("auto", "overwrite"):
            msg = f"resume must be 'auto' or 'overwrite', got {resume!r}"
            raise ConfigError(msg)
        _check_key(planned, key)
        ids = row_ids(planned, key, cfg)
        fp = fingerprint_of_ids(ids, fn, text, cfg, key)
        unsure = "unsure" in fp.fn
        if unsure and resume != "overwrite":
            raise unsure_error(Path(path), fp)
        store = Store(Path(path))
        store.declared = declared(cfg.output_dtype, cfg.columns.output)
        store.lock()
        try:  # an fn of unsure identity never reuses a part, even of "the same" run
            store.start(fp, overwrite=resume == "overwrite", keep_parts=not unsure)
            done = _done_rows(store.load(), ids, key, retry_errors)
        finally:
            store.unlock()  # held again from ``acquire`` (the run starts) to ``close``
        return cls(store, planned, ids, cfg, key, done)

    def acquire(self) -> None:
        """Lock the directory for this run's writes (a ``CheckpointError`` if another holds it).

        ``restrict`` calls it; ``close`` releases it. Between ``open`` and the start of the run
        nothing is held, so an interrupt there leaves no stale lock behind.
        """
        if not self.store.locked:
            self.store.lock()

    @property
    def rows_done(self) -> int:
        return self.done.height

    def restrict(
        self, frame: pl.DataFrame, batches: Batches, row_tokens: np.ndarray,
        row_bytes: np.ndarray,
    ) -> tuple[pl.DataFrame, Batches, np.ndarray, np.ndarray]:
        """The frame, batches, tokens and bytes of the rows still to do (rows renumbered)."""
        self.acquire()
        if len(self.todo) == self.n:
            return frame, batches, row_tokens, row_bytes
        tokens, nbytes = row_tokens[self.todo], row_bytes[self.todo]
        out = narrow(batches, self.todo, self.n, tokens, nbytes, self.cfg)
        return frame[self.todo], out, tokens, nbytes

    def record(self, batch: Batch, out: Outcomes) -> None:
        """``on_batch_done`` hook: journal the batch's rows (outputs or errors) as one part.

        The part is encoded and written by the store's writer thread, off the event loop.
        Outputs that cannot be journaled (Python objects) are a ``CheckpointError`` at once.
        """
        if self.store.failure is not None:  # journaling stopped: the run goes on in memory
            return
        local = batch.rows
        given = local if self.order is None else self.order[local]
        pos = self.todo[given if self.inner is None else self.inner[given]]
        frame, self._seen = out.output_of(batch.rows, self._seen)
        self._write(pos, [out.errors[i] for i in local.tolist()],
                    (out.attempts[local], out.run_batch[local], out.run_agent[local],
                     out.started[local], out.elapsed[local]), frame)

    def record_cached(self, rows: np.ndarray, pieces: list[tuple[np.ndarray, Any]],
                      errors: dict[int, str]) -> None:
        """Journal the rows the response cache answered, as answered rows with
        ``attempts = 0``, so a resumed run rebuilds them from the checkpoint alone.

        ``rows``: positions in ``todo`` (the frame the cache looked up); ``pieces``: their
        outputs as [(rows, Arrow table)]; ``errors``: {row: error} (``cache_errors=True``)."""
        if self.store.failure is not None or not len(rows):
            return
        self.acquire()
        groups: list[tuple[np.ndarray, pl.DataFrame | None]] = [
            (p, pl.DataFrame(pl.from_arrow(t))) for p, t in pieces]
        bare = np.setdiff1d(rows, np.concatenate([p for p, _ in pieces]) if pieces else rows[:0])
        if len(bare):  # (answered by errors only: no output stored)
            groups.append((bare, None))
        for p, outputs in groups:
            n = len(p)
            meta = (np.zeros(n, np.uint16), np.zeros(n, np.uint32), np.zeros(n, np.uint16),
                    np.full(n, np.nan), np.full(n, np.nan))
            self._write(self.todo[p], [errors.get(i) for i in p.tolist()], meta, outputs)

    def _write(self, pos: np.ndarray, errors: list[str | None], meta: tuple[np.ndarray, ...],
               outputs: pl.DataFrame | None) -> None:
        """Queue one part: rows ``pos`` of the planned frame, their errors, (attempts, run
        batch, run agent, started, elapsed) and outputs (None: a failed batch)."""
        import pyarrow as pa  # imported on first use: `import dfbatch` stays light

        if self.hashes is not None:
            ident = {_ROW: pa.array(pos, pa.int64()), _HASH: self.hashes[pos]}
        else:
            ident = {_KEY: self.ids.gather(pos).to_arrow()}
        table = pa.table({**ident, _ERROR: pa.array(errors, pa.string()),
                          **dict(zip((_ATTEMPTS, _RUN_BATCH, _RUN_AGENT, _STARTED, _ELAPSED),
                                     meta, strict=True))})
        if outputs is not None:
            _check_storable(outputs)
            try:
                arrow = outputs.to_arrow()
            except (pl.exceptions.PolarsError, pa.ArrowException) as exc:
                raise _unstorable(exc) from None
            for name, column in zip(arrow.column_names, arrow.columns, strict=True):
                table = table.append_column(name, column)
        self.store.write(table)

    def merge(self, sub: Outcomes) -> Outcomes:
        """Outcomes of every row: the journaled rows plus the pool's (``sub``, todo rows)."""
        if len(self.todo) == self.n:
            return sub
        d, done = self.done[_POS].to_numpy(), self.done
        out = sub.placed(self.n, self.todo)
        out.attempts[d] = done[_ATTEMPTS].to_numpy()
        out.run_batch[d] = done[_RUN_BATCH].to_numpy()
        out.run_agent[d] = done[_RUN_AGENT].to_numpy()
        out.started[d] = done[_STARTED].to_numpy()
        out.elapsed[d] = done[_ELAPSED].to_numpy()
        out.done[d] = True
        for i, e in zip(d.tolist(), done[_ERROR].to_list(), strict=True):
            out.errors[i] = e
        outputs = done.drop(*(c for c in done.columns if c in _META or c == _POS))
        if outputs.width:
            out.pieces.insert(0, (d, outputs))  # (journaled first, as the type decides)
        return out

    def close(self) -> None:
        """Write what is queued, compact the parts into one, and release the lock (once).

        If journaling stopped during the run (the directory was removed, the disk is full), a
        ``CheckpointWarning`` says so and why; the run's results are unaffected.
        """
        if self.closed:
            return
        self.closed = True
        if not self.store.locked:  # the run never started: nothing was written
            return
        try:
            self.store.flush()
            if self.store.failure is not None:
                msg = (f"checkpoint {str(self.store.root)!r}: journaling stopped during the run "
                       f"({self.store.failure}); the run finished in memory and its result is "
                       "complete, but a rerun will redo the rows that were not journaled")
                warnings.warn(msg, CheckpointWarning, stacklevel=3)
                return
            self.store.compact()
        finally:
            self.store.unlock()


def _check_storable(frame: pl.DataFrame) -> None:
    """Refuse outputs that would be journaled as pointer bytes (Python objects)."""
    for name, dtype in frame.schema.items():
        if dtype == pl.Object or "Object" in str(dtype):
            sample = next((v for v in frame[name] if v is not None), None)
            kind = type(sample).__name__ if sample is not None else "object"
            msg = (f"fn returned Python objects ({kind}) in column {name!r}, which a checkpoint "
                   "cannot store; return plain values (str, numbers, lists, dicts / structs), "
                   "e.g. convert them with str() or dataclasses.asdict(), or run without "
                   "checkpoint=")
            raise CheckpointError(msg)


def _check_key(df: pl.DataFrame, key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or key not in df.columns:
        msg = f"key column {key!r} not found.{did_you_mean(str(key), df.columns)}"
        raise ConfigError(msg)
    col = df[key]
    if col.null_count():
        msg = f"key column {key!r} has {col.null_count()} null values; keys must identify rows"
        raise ConfigError(msg)
    if col.n_unique() != col.len():
        dup = col.filter(col.is_duplicated()).head(3).to_list()
        msg = f"key column {key!r} has duplicate values (e.g. {dup}); keys must be unique"
        raise ConfigError(msg)


def _done_rows(
    journal: pl.DataFrame | None, ids: pl.Series, key: str | None, retry_errors: bool
) -> pl.DataFrame:
    """Journaled rows that match an input row (newest entry wins), with their position."""
    empty = pl.DataFrame({_POS: pl.Series(_POS, [], dtype=pl.Int64)})
    if journal is None or journal.height == 0:
        return empty
    if key is None:
        n = ids.len()
        j = journal.filter(pl.col(_ROW).is_between(0, n - 1)).unique(_ROW, keep="last")
        current = ids.gather(j[_ROW]).to_numpy()
        j = j.filter(pl.Series(j[_HASH].to_numpy() == current)).rename({_ROW: _POS})
    else:
        index = pl.DataFrame({_KEY: ids, _POS: np.arange(ids.len())})
        j = journal.unique(_KEY, keep="last")
        try:
            j = j.with_columns(pl.col(_KEY).cast(ids.dtype)).join(index, on=_KEY, how="inner")
        except pl.exceptions.PolarsError as exc:
            msg = f"the checkpoint's keys do not match column {key!r} ({exc})"
            raise CheckpointError(msg) from None
    if retry_errors:
        j = j.filter(pl.col(_ERROR).is_null())
    return j.sort(_POS)


def _unstorable(exc: BaseException) -> CheckpointError:
    msg = (f"cannot journal fn's outputs ({exc}); return plain values (str, numbers, lists, "
           "structs), not Python objects")
    return CheckpointError(msg)
