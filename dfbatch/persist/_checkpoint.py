"""The resume journal: finished batches are journaled to a directory so a rerun skips their rows.

``process(df, fn, checkpoint="runs/sum")`` writes every batch that ends (outputs or an error) as
one Arrow IPC *part* file, and a rerun with the same directory calls ``fn`` only for the rows
that are not in the journal. The layout::

    runs/sum/
      manifest.json                  the run's fingerprint (rows, fn, config) and its digest
      lock                           held (flock) by the process that writes the journal
      parts/<digest>-00000007.arrow  one finished batch (or, after a run, all of them compacted)
      parts/.<digest>-00000008.arrow.tmp   being written: invisible until renamed

**Atomic parts.** A part is written under a temporary name and renamed (atomic on POSIX), so a
crash leaves a complete part or an ignored ``.tmp`` file, never a half-written part. Parts are
only ever added; a compacted part is written before the parts it replaces are deleted, and rows
found twice are deduplicated (the newest wins), so each row is in the result exactly once. A
part that cannot be read (e.g. truncated by a power loss) is set aside with a warning and its
rows are redone. Nothing executable is read back: the manifest is JSON, parts are Arrow data.

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

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import CheckpointError, CheckpointWarning, ConfigError, did_you_mean
from dfbatch.execute._pool import Batch, Outcomes
from dfbatch.persist._fingerprint import (
    HASH_COLUMN,
    Fingerprint,
    fingerprint_of_ids,
    mismatch_error,
    row_ids,
    unsure_error,
)
from dfbatch.persist._fingerprint import callable_name as callable_name  # re-exported
from dfbatch.persist._fingerprint import fingerprint as fingerprint  # re-exported
from dfbatch.persist._fingerprint import fn_identity as fn_identity  # re-exported

if TYPE_CHECKING:
    import pyarrow as pa

Resume = Literal["auto", "overwrite"]
FORMAT = "dfbatch-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"

_ROW, _HASH, _KEY = "__dfbatch_row", HASH_COLUMN, "__dfbatch_key"
_ERROR, _ATTEMPTS = "__dfbatch_error", "__dfbatch_attempts"
_RUN_BATCH, _RUN_AGENT = "__dfbatch_run_batch", "__dfbatch_run_agent"
_STARTED, _ELAPSED = "__dfbatch_started", "__dfbatch_elapsed"
_META = (_ROW, _HASH, _KEY, _ERROR, _ATTEMPTS, _RUN_BATCH, _RUN_AGENT, _STARTED, _ELAPSED)
_POS = "__dfbatch_pos"
_COMPACT_AT = 2  # compact the parts into one when a run ends with at least this many


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

    def __init__(self, store: _Store, planned: pl.DataFrame, ids: pl.Series, cfg: BatchConfig,
                 key: str | None, done: pl.DataFrame) -> None:
        self.store = store
        self.cfg = cfg
        self.key = key
        self.ids = ids
        self.hashes = ids.to_numpy() if key is None else None
        self.n = planned.height
        self.done = done  # journaled rows to keep, sorted by _POS
        self.closed = False
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
        if "unsure" in fp.fn and resume != "overwrite":
            raise unsure_error(Path(path), fp)
        store = _Store(Path(path))
        store.lock()
        try:
            store.start(fp, overwrite=resume == "overwrite")
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
        self, frame: pl.DataFrame, batches: list[list[Batch]], row_tokens: np.ndarray,
        row_bytes: np.ndarray,
    ) -> tuple[pl.DataFrame, list[list[Batch]], np.ndarray, np.ndarray]:
        """The frame, batches, tokens and bytes of the rows still to do (rows renumbered)."""
        self.acquire()
        if len(self.todo) == self.n:
            return frame, batches, row_tokens, row_bytes
        new_pos = np.full(self.n, -1, np.int64)
        new_pos[self.todo] = np.arange(len(self.todo))
        tokens, nbytes = row_tokens[self.todo], row_bytes[self.todo]
        cfg = self.cfg
        out: list[list[Batch]] = []
        for queue in batches:
            kept = []
            for b in queue:
                rows = new_pos[b.rows]
                rows = rows[rows >= 0]
                if len(rows) == len(b.rows):
                    kept.append(dataclasses.replace(b, rows=rows))
                elif len(rows):  # some rows of this batch are done: send the others
                    need = (cfg.request_overhead_tokens + int(tokens[rows].sum())
                            + cfg.output_tokens_per_row * len(rows))
                    kept.append(Batch(b.id, b.planned_agent, rows, need,
                                      int(nbytes[rows].sum()), b.call_anyway))
            out.append(kept)
        return frame[self.todo], out, tokens, nbytes

    def record(self, batch: Batch, out: Outcomes) -> None:
        """``on_batch_done`` hook: journal the batch's rows (outputs or errors) as one part."""
        import pyarrow as pa  # imported on first use: `import dfbatch` stays light

        local = batch.rows
        pos = self.todo[local]
        if self.hashes is not None:
            ident = {_ROW: pa.array(pos, pa.int64()), _HASH: self.hashes[pos]}
        else:
            ident = {_KEY: self.ids.gather(pos).to_arrow()}
        cols: dict[str, Any] = {
            **ident,
            _ERROR: pa.array([out.errors[i] for i in local.tolist()], pa.string()),
            _ATTEMPTS: out.attempts[local], _RUN_BATCH: out.run_batch[local],
            _RUN_AGENT: out.run_agent[local], _STARTED: out.started[local],
            _ELAPSED: out.elapsed[local],
        }
        table = pa.table(cols)
        if out.pieces and out.pieces[-1][0] is local:  # the pool just appended its outputs
            try:
                outputs = out.pieces[-1][1].to_arrow()
            except (pl.exceptions.PolarsError, pa.ArrowException) as exc:
                raise _unstorable(exc) from None
            for name, column in zip(outputs.column_names, outputs.columns, strict=True):
                table = table.append_column(name, column)
        self.store.write(table)

    def merge(self, sub: Outcomes) -> Outcomes:
        """Outcomes of every row: the journaled rows plus the pool's (``sub``, todo rows)."""
        if len(self.todo) == self.n:
            return sub
        out = Outcomes(self.n)
        d, t, done = self.done[_POS].to_numpy(), self.todo, self.done
        out.attempts[d] = done[_ATTEMPTS].to_numpy()
        out.run_batch[d] = done[_RUN_BATCH].to_numpy()
        out.run_agent[d] = done[_RUN_AGENT].to_numpy()
        out.started[d] = done[_STARTED].to_numpy()
        out.elapsed[d] = done[_ELAPSED].to_numpy()
        out.done[d] = True
        for a, b in ((out.attempts, sub.attempts), (out.run_batch, sub.run_batch),
                     (out.run_agent, sub.run_agent), (out.started, sub.started),
                     (out.elapsed, sub.elapsed), (out.done, sub.done)):
            a[t] = b
        errors = out.errors
        for i, e in zip(d.tolist(), done[_ERROR].to_list(), strict=True):
            errors[i] = e
        for i, e in zip(t.tolist(), sub.errors, strict=True):
            errors[i] = e
        outputs = done.drop(*(c for c in done.columns if c in _META or c == _POS))
        if outputs.width:
            out.pieces.append((d, outputs))
        out.pieces.extend((t[rows], frame) for rows, frame in sub.pieces)
        return out

    def close(self) -> None:
        """Compact the parts into one, and release the lock (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if not self.store.locked:  # the run never started: nothing was written
            return
        try:
            self.store.compact()
        finally:
            self.store.unlock()


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


# -- the directory -------------------------------------------------------------------------
class _Store:
    """Manifest, lock and part files of one checkpoint directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts = root / "parts"
        self.prefix = ""
        self.seq = 0
        self._lock_fd: int | None = None

    def lock(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            msg = f"checkpoint {str(self.root)!r} is a file; pass a directory path"
            raise CheckpointError(msg)
        if self.root.is_dir() and not (self.root / MANIFEST).exists():
            strangers = sorted(p.name for p in self.root.iterdir()
                               if p.name not in (MANIFEST, "lock", "parts"))
            if strangers:
                msg = (f"{str(self.root)!r} is not a dfbatch checkpoint (it holds "
                       f"{strangers[:3]}); pass a new or empty directory")
                raise CheckpointError(msg)
        self.parts.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock (Windows): no protection
            pass
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            msg = (f"checkpoint {str(self.root)!r} is in use by another run (process {holder}); "
                   "wait for it to end, or use another directory")
            raise CheckpointError(msg) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def start(self, fp: Fingerprint, *, overwrite: bool) -> None:
        """Check the manifest against ``fp`` (or write it), and drop stale files."""
        path = self.root / MANIFEST
        old = _read_manifest(path) if path.exists() else None
        if old is not None and old["digest"] != fp.digest and not overwrite:
            raise mismatch_error(self.root, fp, old)
        if old is None or old["digest"] != fp.digest:
            manifest = {"format": FORMAT, "version": VERSION, "digest": fp.digest,
                        "polars": pl.__version__, "fingerprint": fp.as_dict()}
            tmp = self.root / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _publish(tmp, path)
        self.prefix = fp.digest
        for p in self.parts.iterdir():  # tmp files of a crash, parts of an overwritten run
            if p.name.startswith(".") or not p.name.startswith(self.prefix):
                with contextlib.suppress(OSError):
                    p.unlink()
        seqs = [_seq(p) for p in self._part_files()]
        self.seq = max(seqs, default=-1) + 1

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob(f"{self.prefix}-*.arrow"), key=_seq)

    def write(self, table: pa.Table) -> None:
        """Write one part: to a temporary name first, then renamed (atomic)."""
        import pyarrow as pa
        import pyarrow.ipc as ipc

        name = f"{self.prefix}-{self.seq:08d}.arrow"
        self.seq += 1
        tmp = self.parts / f".{name}.tmp"
        try:
            with pa.OSFile(str(tmp), "wb") as f, ipc.new_file(f, table.schema) as writer:
                writer.write_table(table)
        except pa.ArrowException as exc:
            tmp.unlink(missing_ok=True)
            raise _unstorable(exc) from None
        _publish(tmp, self.parts / name)

    def load(self) -> pl.DataFrame | None:
        frames = [f for f in map(self._read_part, self._part_files()) if f is not None]
        if not frames:
            return None
        try:
            return pl.concat(frames, how="diagonal_relaxed")
        except (pl.exceptions.PolarsError, TypeError):
            msg = "fn returned different types in different batches; outputs were cast to text"
            warnings.warn(msg, stacklevel=4)
            return pl.concat([f.with_columns(pl.exclude(*_META).cast(pl.Utf8)) for f in frames],
                             how="diagonal_relaxed")

    def _read_part(self, path: Path) -> pl.DataFrame | None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        try:
            with pa.OSFile(str(path)) as f:
                table = ipc.open_file(f).read_all()
            return pl.DataFrame(pl.from_arrow(table))
        except (pa.ArrowInvalid, OSError) as exc:
            aside = path.with_name(f".{path.name}.damaged")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            msg = f"checkpoint part {path.name} is damaged ({exc}); its rows will run again"
            warnings.warn(msg, CheckpointWarning, stacklevel=5)
            return None

    def compact(self) -> None:
        """Rewrite the parts as one (newest entry of a row wins), then delete the old ones."""
        import pyarrow as pa

        files = self._part_files()
        if len(files) < _COMPACT_AT:
            return
        try:
            joined = self.load()
            if joined is None:
                return
            ident = _KEY if _KEY in joined.columns else _ROW
            self.write(joined.unique(ident, keep="last", maintain_order=True).to_arrow())
        except (OSError, pl.exceptions.PolarsError, pa.ArrowException, CheckpointError) as exc:
            msg = f"could not compact checkpoint {str(self.root)!r} ({exc}); it stays usable"
            warnings.warn(msg, CheckpointWarning, stacklevel=3)
            return
        for p in files:
            with contextlib.suppress(OSError):
                p.unlink()


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written file visible under its final name (atomic rename)."""
    os.replace(tmp, final)


def _unstorable(exc: BaseException) -> CheckpointError:
    msg = (f"cannot journal fn's outputs ({exc}); return plain values (str, numbers, lists, "
           "structs), not Python objects")
    return CheckpointError(msg)


def _seq(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = (f"checkpoint manifest {str(path)!r} is damaged ({exc}); delete the directory or "
               "pass resume='overwrite'")
        raise CheckpointError(msg) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "digest" not in data:
        msg = f"{str(path)!r} is not a dfbatch checkpoint manifest"
        raise CheckpointError(msg)
    if data.get("version") != VERSION:
        msg = (f"checkpoint {str(path.parent)!r} has format version {data.get('version')}, this "
               f"dfbatch writes version {VERSION}; use another directory or resume='overwrite'")
        raise CheckpointError(msg)
    return data
