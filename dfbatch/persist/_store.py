"""One checkpoint directory on disk: manifest, lock, checksummed parts, a background writer.

**Checksums.** Every part is named ``<run digest>-<seq>-<blake2b of its bytes>.arrow``: the
checksum is published by the same atomic rename that makes the part visible, so a part and its
checksum never disagree (a manifest listing the parts would be rewritten after every batch).
A part is read only after its bytes hash to its name; a part that does not (flipped bits,
truncation, a stray file) is moved aside as ``.<name>.damaged`` with a ``CheckpointWarning``
and its rows run again, so a damaged part costs calls, never a crash or a wrong value. The
manifest carries a checksum of its own content: a damaged manifest is a ``CheckpointError``
(the run's identity is unknown, so nothing in the directory is trusted; the message says to
pass ``resume='overwrite'``).

**Writing off the loop.** ``write`` hands the part to one writer thread, which encodes and
writes parts in order; ``flush`` waits for it. At most ``MAX_QUEUED`` parts wait (then
``write`` blocks), so a crash loses at most that many finished batches besides the ones in
flight. A write that fails (the directory was removed, the disk is full) stops journaling:
later parts are dropped, the temporary file is removed, and ``failure`` says why; the run goes
on in memory (``Journal.close`` warns).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from dfbatch.errors import CheckpointError, CheckpointWarning
from dfbatch.persist._fingerprint import HASH_COLUMN, mismatch_error
from dfbatch.persist._lock import hold

if TYPE_CHECKING:
    import pyarrow as pa

    from dfbatch.persist._fingerprint import Fingerprint

# the columns of a part besides fn's outputs (the storage format)
ROW, HASH, KEY = "__dfbatch_row", HASH_COLUMN, "__dfbatch_key"
ERROR, ATTEMPTS = "__dfbatch_error", "__dfbatch_attempts"
RUN_BATCH, RUN_AGENT = "__dfbatch_run_batch", "__dfbatch_run_agent"
STARTED, ELAPSED = "__dfbatch_started", "__dfbatch_elapsed"
META = (ROW, HASH, KEY, ERROR, ATTEMPTS, RUN_BATCH, RUN_AGENT, STARTED, ELAPSED)

FORMAT = "dfbatch-checkpoint"
VERSION = 2  # 2: checksummed part names, manifest checksum
MANIFEST = "manifest.json"
MAX_QUEUED = 8  # parts waiting for the writer thread before ``write`` blocks


def checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Store:
    """Manifest, lock and part files of one checkpoint directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts = root / "parts"
        self.prefix = ""
        self.seq = 0
        self.failure: str | None = None  # why journaling stopped (a write failed)
        self.declared: dict[str, Any] | None = None  # the run's output_dtype, as a schema
        self._lock_fd: int | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._mutex = threading.Lock()

    # -- the lock ----------------------------------------------------------------------------
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
        self._lock_fd = hold(self.root / "lock", f"checkpoint {str(self.root)!r}",
                             "wait for it to end, or use another directory")
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.unlock()
            msg = f"cannot use checkpoint {str(self.root)!r}: {exc}"
            raise CheckpointError(msg) from None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- the manifest --------------------------------------------------------------------------
    def start(self, fp: Fingerprint, *, overwrite: bool, keep_parts: bool = True) -> None:
        """Check the manifest against ``fp`` (or write it), and drop stale files.

        ``overwrite``: write a new manifest whatever the old one says; parts of this same run
        are kept unless ``keep_parts`` is false.
        """
        path = self.root / MANIFEST
        old = None
        if path.exists() and not overwrite:
            old = read_manifest(path)
            if old["digest"] != fp.digest:
                raise mismatch_error(self.root, fp, old)
        if old is None:
            body = {"format": FORMAT, "version": VERSION, "digest": fp.digest,
                    "polars": pl.__version__, "fingerprint": fp.as_dict()}
            manifest = {**body, "checksum": checksum(_canonical(body))}
            tmp = self.root / f".{MANIFEST}.tmp"
            try:
                tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                msg = f"cannot write checkpoint {str(self.root)!r}: {exc}"
                raise CheckpointError(msg) from None
        self.prefix = fp.digest
        for p in self.parts.iterdir():  # tmp files of a crash, parts of an overwritten run
            if p.name.startswith(".") or not p.name.startswith(self.prefix) or not keep_parts:
                with contextlib.suppress(OSError):
                    p.unlink()
        seqs = [_seq(p) for p in self._part_files()]
        self.seq = max((s for s in seqs if s is not None), default=-1) + 1

    # -- parts ---------------------------------------------------------------------------------
    def _part_files(self) -> list[Path]:
        try:
            files = [p for p in self.parts.glob(f"{self.prefix}-*.arrow") if p.is_file()]
        except OSError:
            return []
        return sorted(files, key=lambda p: (_seq(p) is None, _seq(p) or 0, p.name))

    def write(self, table: pa.Table) -> None:
        """Queue one part for the writer thread (in order); nothing once a write has failed."""
        if self.failure is not None:
            return
        seq = self.seq
        self.seq += 1
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="dfbatch-journal")
        self._pending = [f for f in self._pending if not f.done()]
        if len(self._pending) >= MAX_QUEUED:  # a stalled disk: wait rather than pile up
            self._pending.pop(0).result()  # (what a crash can lose stays bounded)
        self._pending.append(self._writer.submit(self._write_now, table, seq))

    def flush(self) -> None:
        """Wait until every queued part is written (or journaling stopped)."""
        for f in self._pending:
            f.result()
        self._pending.clear()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _write_now(self, table: pa.Table, seq: int) -> None:
        if self.failure is not None:
            return
        tmp = self.parts / f".{self.prefix}-{seq:08d}.arrow.tmp"
        try:
            data = encode(table)
            tmp.write_bytes(data)
            _publish(tmp, self.parts / f"{self.prefix}-{seq:08d}-{checksum(data)}.arrow")
        except Exception as exc:  # disk full, directory removed, ... : stop journaling
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            with self._mutex:
                if self.failure is None:
                    self.failure = f"{type(exc).__name__}: {exc}"

    def load(self) -> pl.DataFrame | None:
        """Every readable part, outputs conformed to one type per column (as in a result:
        values that do not fit the first part's type, or ``declared``, become row errors)."""
        from dfbatch.execute._outputs import conform, decide_schema

        frames = [f for f in map(self._read_part, self._part_files()) if f is not None]
        if not frames:
            return None
        outputs = [f.drop(*(c for c in META if c in f.columns)) for f in frames]
        schema = decide_schema(outputs, self.declared)
        fitted = []
        for frame, out in zip(frames, outputs, strict=True):
            out, errors = conform(out, schema)
            meta = frame.select(c for c in frame.columns if c in META)
            if errors is not None:
                meta = meta.with_columns(pl.coalesce(ERROR, pl.Series(errors, dtype=pl.Utf8)))
            fitted.append(pl.concat([meta, out], how="horizontal"))
        return pl.concat(fitted, how="diagonal_relaxed")

    def _read_part(self, path: Path) -> pl.DataFrame | None:
        """A part whose bytes hash to its name, else None (set aside with a warning)."""
        expected = path.stem.rsplit("-", 1)[-1] if _seq(path) is not None else None
        try:
            data = path.read_bytes()
            if expected is None or checksum(data) != expected:
                why = "its checksum does not match" if expected else "its name is not a part's"
                raise ValueError(why)
            return pl.DataFrame(pl.from_arrow(decode(data)))
        except Exception as exc:  # only after the checksum: bytes we wrote ourselves
            aside = path.with_name(f".{path.name}.damaged")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            msg = f"checkpoint part {path.name} is damaged ({exc}); its rows will run again"
            warnings.warn(msg, CheckpointWarning, stacklevel=5)
            return None

    def compact(self) -> None:
        """Rewrite the parts as one (newest entry of a row wins), then delete the old ones."""
        files = self._part_files()
        if len(files) < 2 or self.failure is not None:
            return
        try:
            joined = self.load()
            if joined is None:
                return
            ident = KEY if KEY in joined.columns else ROW
            self.write(joined.unique(ident, keep="last", maintain_order=True).to_arrow())
            self.flush()
        except Exception as exc:
            self.failure = self.failure or f"{type(exc).__name__}: {exc}"
        if self.failure is not None:
            msg = (f"could not compact checkpoint {str(self.root)!r} ({self.failure}); "
                   "it stays usable")
            warnings.warn(msg, CheckpointWarning, stacklevel=3)
            return
        for p in files:
            with contextlib.suppress(OSError):
                p.unlink()


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written file visible under its final name (atomic rename)."""
    os.replace(tmp, final)


def encode(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(data: bytes) -> pa.Table:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    return ipc.open_file(pa.BufferReader(data)).read_all()


def _seq(path: Path) -> int | None:
    bits = path.stem.split("-")
    if len(bits) != 3 or not bits[1].isdigit() or len(bits[2]) != 32:
        return None
    return int(bits[1])


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked: a damaged or foreign one is a ``CheckpointError`` with the fix."""
    fix = "delete the directory or pass resume='overwrite'"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"checkpoint manifest {str(path)!r} is damaged ({exc}); {fix}"
        raise CheckpointError(msg) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "digest" not in data:
        msg = f"{str(path)!r} is not a dfbatch checkpoint manifest; {fix}"
        raise CheckpointError(msg)
    if data.get("version") != VERSION:
        msg = (f"checkpoint {str(path.parent)!r} has format version {data.get('version')!r}, "
               f"this dfbatch writes version {VERSION}; use another directory or "
               "resume='overwrite'")
        raise CheckpointError(msg)
    body = {k: v for k, v in data.items() if k != "checksum"}
    if data.get("checksum") != checksum(_canonical(body)):
        msg = f"checkpoint manifest {str(path)!r} is damaged (checksum mismatch); {fix}"
        raise CheckpointError(msg)
    return data
