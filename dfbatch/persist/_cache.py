"""The response cache: one SQLite file of answers keyed by (fn, config, row inputs), across runs.

``process(df, fn, cache=True)`` looks every row up before a batch is sent: a row whose key is
in the cache takes its stored output and is never sent, and every new answer is written as it
arrives. ``Cache`` is the store (this module); ``dfbatch.persist._cache_run`` makes the keys and
the run's hooks.

**Store.** One SQLite database (stdlib ``sqlite3``) in WAL mode, by default
``platformdirs.user_cache_dir("dfbatch")/responses.sqlite``. Several processes and notebooks
may read and write it at once: writes are short ``BEGIN IMMEDIATE`` transactions, a writer waits
for another (``busy_timeout``), and a key is stored once (its primary key); a crash mid-write
rolls the transaction back, so every entry read back is whole. Nothing executable is stored:
the answers of one write are one Arrow IPC stream (a *chunk*), and an entry (the key, its
chunk, its row in it, its error) points into it.

**Size.** ``max_size`` bounds the bytes of stored outputs (default 2 GiB; None: unbounded);
when a write passes it, the least recently used chunks and their entries are evicted down to
90% of it (a hit refreshes its chunk's ``accessed`` time, at most once a minute).
``dfbatch cache info / clear / prune`` on the CLI.

Examples
--------
>>> import tempfile, os, polars as pl, dfbatch
>>> cache = dfbatch.Cache(os.path.join(tempfile.mkdtemp(), "c.sqlite"))
>>> calls = []
>>> def fn(batch):
...     calls.append(batch.height)
...     return batch["text"].str.to_uppercase()
>>> df = pl.DataFrame({"text": ["a", "b", "c"]})
>>> _ = dfbatch.process(df, fn, cache=cache, progress=False)
>>> again = dfbatch.process(df, fn, cache=cache, progress=False)
>>> sum(calls), again["output"].to_list(), again["cached"].to_list()
(3, ['A', 'B', 'C'], [True, True, True])
>>> cache.info()["entries"]
3
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfbatch.errors import ConfigError

DEFAULT_MAX_SIZE = 2 * 1024**3
_BUSY_MS = 60_000
_CHUNK = 50_000  # keys per lookup statement
_ROW_BYTES = 48  # what an entry costs besides its share of a chunk
_FRESH_S = 60.0  # a chunk used less than this long ago is not touched again (LRU)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, data BLOB, size INTEGER NOT NULL, accessed REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_accessed ON chunks (accessed);
CREATE TABLE IF NOT EXISTS entries (
    k1 INTEGER NOT NULL, k2 INTEGER NOT NULL, chunk INTEGER NOT NULL, idx INTEGER NOT NULL,
    error TEXT, PRIMARY KEY (k1, k2)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_chunk ON entries (chunk);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('size', 0);
CREATE TRIGGER IF NOT EXISTS size_ins AFTER INSERT ON chunks BEGIN
    UPDATE meta SET value = value + NEW.size WHERE name = 'size'; END;
CREATE TRIGGER IF NOT EXISTS size_del AFTER DELETE ON chunks BEGIN
    UPDATE meta SET value = value - OLD.size WHERE name = 'size'; END;
"""


def default_path() -> Path:
    """``user_cache_dir("dfbatch")/responses.sqlite`` (``DFBATCH_CACHE`` overrides it)."""
    env = os.environ.get("DFBATCH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("dfbatch")) / "responses.sqlite"


class Cache:
    """A response cache file (SQLite, WAL): pass it as ``process(..., cache=Cache(...))``.

    Parameters
    ----------
    path
        The database file (created with its folder); None: ``default_path()``.
    max_size
        Bytes of stored outputs kept at most (least recently used entries are evicted first);
        None: unbounded.
    refresh
        Look nothing up: call every row and overwrite the stored answers (``cache="refresh"``
        is ``Cache(refresh=True)``).

    >>> import tempfile, os
    >>> c = Cache(os.path.join(tempfile.mkdtemp(), "x.sqlite"), max_size=10_000)
    >>> c.info()["entries"], c.info()["max_size"]
    (0, 10000)
    """

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 max_size: int | None = DEFAULT_MAX_SIZE, *, refresh: bool = False) -> None:
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                     or max_size <= 0):
            msg = f"max_size must be a number of bytes > 0 or None, got {max_size!r}"
            raise ConfigError(msg)
        self.path = Path(path) if path is not None else default_path()
        self.max_size = max_size
        self.refresh = refresh
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, max_size={self.max_size!r})"

    # -- connections -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are per thread)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: lookups of 1M keys stay warm
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
            self._local.conn = conn
        return conn

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's connection (reopened on next use)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- reads -------------------------------------------------------------------------------
    def lookup(self, k1: np.ndarray, k2: np.ndarray, *, errors: bool = False,
               touch: bool = True, values: bool = True,
               ) -> tuple[np.ndarray, list[tuple[np.ndarray, Any]], dict[int, str]]:
        """Which keys are stored: (hit positions, [(positions, Arrow table)], {pos: error}).

        Entries that hold an error count only with ``errors=True``. Hits are touched (LRU).
        ``values=False``: only the positions (nothing decoded).
        """
        conn = self._conn()
        found: list[tuple[int, int, int, str | None]] = []
        a, b = _signed(k1), _signed(k2)
        order = np.lexsort((b, a))  # keys in index order: the B-tree is walked, not jumped
        with _write(conn, "BEGIN"):
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS q (k1 INTEGER, k2 INTEGER, pos INTEGER)")
            for s in range(0, len(a), _CHUNK):
                part = order[s:s + _CHUNK]
                conn.execute("DELETE FROM temp.q")
                conn.executemany("INSERT INTO temp.q VALUES (?, ?, ?)",
                                 zip(a[part].tolist(), b[part].tolist(), part.tolist(),
                                     strict=True))
                found += conn.execute("SELECT q.pos, e.chunk, e.idx, e.error FROM temp.q q "
                                      "JOIN entries e ON e.k1 = q.k1 AND e.k2 = q.k2")
            errs = {r[0]: r[3] for r in found if r[3] is not None}
            if errs and not errors:
                found = [r for r in found if r[3] is None]
                errs = {}
            got = np.array([r[:3] for r in found], np.int64).reshape(-1, 3)
            pos, chunk, idx = got[:, 0], got[:, 1], got[:, 2]
            pieces = self._values(conn, pos, chunk, idx, errs) if values and len(pos) else []
        if touch and len(pos):
            self._touch(conn, np.unique(chunk))
        return np.sort(pos), pieces, errs

    def _values(self, conn: sqlite3.Connection, pos: np.ndarray, chunk: np.ndarray,
                idx: np.ndarray, errs: dict[int, str]) -> list[tuple[np.ndarray, Any]]:
        """Decode each chunk once, take the rows asked for, one table per output schema."""
        import pyarrow as pa

        order = np.argsort(chunk, kind="stable")
        ids, starts = np.unique(chunk[order], return_index=True)
        by_schema: dict[Any, tuple[list[np.ndarray], list[Any]]] = {}
        data: dict[int, bytes | None] = {}
        id_list = ids.tolist()
        for s in range(0, len(id_list), 500):
            part = id_list[s:s + 500]
            marks = ",".join("?" * len(part))
            data.update(conn.execute(f"SELECT id, data FROM chunks WHERE id IN ({marks})", part))
        for i, rows in zip(id_list, np.split(order, starts[1:]), strict=True):
            blob = data.get(i)
            if blob is None:  # errors only (or a chunk evicted under us: those rows miss)
                continue
            table = pa.ipc.open_stream(pa.py_buffer(blob)).read_all().take(pa.array(idx[rows]))
            got = by_schema.setdefault(table.schema, ([], []))
            got[0].append(pos[rows])
            got[1].append(table)
        return [(np.concatenate(p), pa.concat_tables(t)) for p, t in by_schema.values()]

    def _touch(self, conn: sqlite3.Connection, chunks: np.ndarray) -> None:
        now = time.time()
        ids = chunks.tolist()
        with _write(conn):
            for s in range(0, len(ids), 500):
                part = ids[s:s + 500]
                marks = ",".join("?" * len(part))
                conn.execute(f"UPDATE chunks SET accessed = ? WHERE id IN ({marks}) AND "
                             "accessed < ?", (now, *part, now - _FRESH_S))

    # -- writes ------------------------------------------------------------------------------
    def store(self, k1: np.ndarray, k2: np.ndarray, table: Any, errors: Sequence[str | None],
              *, overwrite: bool = False) -> None:
        """Store one group of answers (one Arrow table, row i for key i, or None when every
        row failed) in one short transaction; an existing key is kept unless ``overwrite`` or
        it holds an error and the new entry an answer."""
        data = None if table is None else encode(table)
        size = (len(data) if data is not None else 0) + _ROW_BYTES * len(errors)
        verb = ("ON CONFLICT (k1, k2) DO UPDATE SET chunk = excluded.chunk, idx = excluded.idx, "
                "error = excluded.error")
        if not overwrite:  # an answer replaces a stored error, nothing else is replaced
            verb += " WHERE entries.error IS NOT NULL AND excluded.error IS NULL"
        conn = self._conn()
        with _write(conn):
            chunk = conn.execute("INSERT INTO chunks (data, size, accessed) VALUES (?, ?, ?)",
                                 (data, size, time.time())).lastrowid
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?) " + verb,
                zip(_signed(k1).tolist(), _signed(k2).tolist(), itertools.repeat(chunk),
                    range(len(errors)), errors))
            if conn.total_changes == before:  # another process stored every key first
                conn.execute("DELETE FROM chunks WHERE id = ?", (chunk,))
            if self.max_size is not None:
                self._evict(conn, self.max_size)

    def _evict(self, conn: sqlite3.Connection, limit: int) -> int:
        """Delete the least recently used chunks (and their entries) until the size is <= 90%
        of ``limit``; returns how many entries went."""
        size = self._size(conn)
        target, gone = int(limit * 0.9), 0
        while size > target:
            old = conn.execute("SELECT id, size FROM chunks ORDER BY accessed, id LIMIT 64"
                               ).fetchall()
            if not old:
                break
            ids = []
            for i, n in old:
                if size <= target:
                    break
                ids.append(i)
                size -= n
            marks = ",".join("?" * len(ids))
            gone += conn.execute(f"DELETE FROM entries WHERE chunk IN ({marks})", ids).rowcount
            conn.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
        return gone

    @staticmethod
    def _size(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE name = 'size'").fetchone()[0])

    # -- maintenance (the CLI) ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Entries, errors stored, bytes of outputs, file bytes, bounds, oldest/newest access."""
        conn = self._conn()
        n, errs = conn.execute("SELECT count(*), count(error) FROM entries").fetchone()
        old, new = conn.execute("SELECT min(accessed), max(accessed) FROM chunks").fetchone()
        files = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*")
                    if p.is_file())
        return {"path": str(self.path), "entries": n, "errors": errs,
                "size": self._size(conn), "file_size": files, "max_size": self.max_size,
                "oldest_access": old, "newest_access": new}

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        conn = self._conn()
        with _write(conn):
            n = conn.execute("DELETE FROM entries").rowcount
            conn.execute("DELETE FROM chunks")
        conn.execute("VACUUM")
        return int(n)

    def prune(self, max_size: int | None = None, older_than_s: float | None = None) -> int:
        """Evict down to ``max_size`` (default: the cache's) and entries not used for
        ``older_than_s`` seconds; returns how many were deleted."""
        conn = self._conn()
        gone = 0
        with _write(conn):
            if older_than_s is not None:
                old = "SELECT id FROM chunks WHERE accessed < ?"
                cut = (time.time() - older_than_s,)
                gone += conn.execute(f"DELETE FROM entries WHERE chunk IN ({old})", cut).rowcount
                conn.execute(f"DELETE FROM chunks WHERE id IN ({old})", cut)
            limit = max_size if max_size is not None else self.max_size
            if limit is not None:
                gone += self._evict(conn, limit)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone


def encode(table: Any) -> bytes:
    """An Arrow table as the bytes of one IPC stream (data only: nothing executable)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@contextlib.contextmanager
def _write(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One short transaction; a write one is taken at once (no deadlock between readers
    upgrading to writers)."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _signed(a: np.ndarray) -> np.ndarray:
    """uint64 keys as the int64 SQLite stores."""
    return np.ascontiguousarray(a, dtype=np.uint64).view(np.int64)
