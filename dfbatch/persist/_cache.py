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
an output row is an Arrow IPC record-batch message, its schema is stored once (``schemas``).

**Size.** ``max_size`` bounds the bytes of stored outputs (default 2 GiB; None: unbounded);
when a write passes it, the least recently used entries are evicted down to 90% of it (every
hit refreshes an entry's ``accessed`` time). ``dfbatch cache info / clear / prune`` on the CLI.

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
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_BUSY_MS = 60_000
_CHUNK = 50_000  # keys per lookup statement
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    k1 INTEGER NOT NULL, k2 INTEGER NOT NULL,
    schema_id INTEGER, value BLOB, error TEXT,
    size INTEGER NOT NULL, created REAL NOT NULL, accessed REAL NOT NULL,
    PRIMARY KEY (k1, k2)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_accessed ON entries (accessed);
CREATE TABLE IF NOT EXISTS schemas (id INTEGER PRIMARY KEY, bytes BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('size', 0);
CREATE TRIGGER IF NOT EXISTS size_ins AFTER INSERT ON entries BEGIN
    UPDATE meta SET value = value + NEW.size WHERE name = 'size'; END;
CREATE TRIGGER IF NOT EXISTS size_del AFTER DELETE ON entries BEGIN
    UPDATE meta SET value = value - OLD.size WHERE name = 'size'; END;
CREATE TRIGGER IF NOT EXISTS size_upd AFTER UPDATE OF size ON entries BEGIN
    UPDATE meta SET value = value + NEW.size - OLD.size WHERE name = 'size'; END;
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
               touch: bool = True, values: bool = True) -> tuple[np.ndarray, list[tuple[np.ndarray, bytes, list[bytes]]],
                                            dict[int, str]]:
        """Which keys are stored: (hit positions, [(positions, schema, messages)], {pos: error}).

        Entries that hold an error count only with ``errors=True``. Hits are touched (LRU).
        ``values=False``: only the positions (nothing decoded).
        """
        conn = self._conn()
        found_pos: list[int] = []
        by_schema: dict[int, tuple[list[int], list[bytes]]] = {}
        errs: dict[int, str] = {}
        now = time.time()
        a, b = _signed(k1), _signed(k2)
        with _write(conn) if touch else contextlib.nullcontext():
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS q (k1 INTEGER, k2 INTEGER, pos INTEGER)")
            for s in range(0, len(a), _CHUNK):
                conn.execute("DELETE FROM temp.q")
                conn.executemany("INSERT INTO temp.q VALUES (?, ?, ?)",
                                 zip(a[s:s + _CHUNK].tolist(), b[s:s + _CHUNK].tolist(),
                                     range(s, min(s + _CHUNK, len(a))), strict=True))
                rows = conn.execute(
                    "SELECT q.pos, e.schema_id, e.value, e.error FROM temp.q q "
                    "JOIN entries e ON e.k1 = q.k1 AND e.k2 = q.k2").fetchall()
                for pos, sid, value, error in rows:
                    if error is not None:
                        if not errors:
                            continue
                        errs[pos] = error
                    found_pos.append(pos)
                    if value is not None and values:
                        got = by_schema.setdefault(sid, ([], []))
                        got[0].append(pos)
                        got[1].append(value)
                if touch and rows:
                    conn.execute("UPDATE entries SET accessed = ? WHERE (k1, k2) IN "
                                 "(SELECT k1, k2 FROM temp.q)", (now,))
        schemas = dict(conn.execute("SELECT id, bytes FROM schemas").fetchall()) if by_schema \
            else {}
        groups = [(np.asarray(p, np.int64), schemas[sid], msgs)
                  for sid, (p, msgs) in by_schema.items()]
        return np.asarray(sorted(found_pos), np.int64), groups, errs

    # -- writes ------------------------------------------------------------------------------
    def store(self, k1: np.ndarray, k2: np.ndarray, schema: bytes | None,
              values: Sequence[bytes | None], errors: Sequence[str | None], *,
              overwrite: bool = False) -> None:
        """Store entries (one short transaction); an existing key is kept unless ``overwrite``."""
        conn = self._conn()
        now = time.time()
        verb = ("ON CONFLICT (k1, k2) DO UPDATE SET schema_id = excluded.schema_id, value = "
                "excluded.value, error = excluded.error, size = excluded.size, accessed = "
                "excluded.accessed" if overwrite else "ON CONFLICT DO NOTHING")
        with _write(conn):
            sid = None
            if schema is not None:
                conn.execute("INSERT OR IGNORE INTO schemas (bytes) VALUES (?)", (schema,))
                sid = conn.execute("SELECT id FROM schemas WHERE bytes = ?",
                                   (schema,)).fetchone()[0]
            conn.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?) " + verb,
                ((x, y, sid if v is not None else None, v, e,
                  (len(v) if v is not None else 0) + len(e or "") + 16, now, now)
                 for x, y, v, e in zip(_signed(k1).tolist(), _signed(k2).tolist(), values,
                                       errors, strict=True)))
            if self.max_size is not None:
                self._evict(conn, self.max_size)

    def _evict(self, conn: sqlite3.Connection, limit: int) -> int:
        """Delete the least recently used entries until the size is <= 90% of ``limit``."""
        size = self._size(conn)
        if size <= limit:
            return 0
        target, gone = int(limit * 0.9), 0
        count = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        mean = max(size / max(count, 1), 1.0)
        while size > target:  # the oldest first, about as many as the excess, never many more
            n = int(min(1024, max(1, (size - target) // mean)))
            freed = conn.execute(
                "DELETE FROM entries WHERE (k1, k2) IN (SELECT k1, k2 FROM entries "
                "ORDER BY accessed LIMIT ?) RETURNING size", (n,)).fetchall()
            if not freed:
                break
            gone += len(freed)
            size -= sum(f[0] for f in freed)
        return gone

    @staticmethod
    def _size(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE name = 'size'").fetchone()[0])

    # -- maintenance (the CLI) ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Entries, errors stored, bytes of outputs, file bytes, bounds, oldest/newest access."""
        conn = self._conn()
        n, errs, old, new = conn.execute(
            "SELECT count(*), count(error), min(accessed), max(accessed) FROM entries").fetchone()
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
            conn.execute("DELETE FROM schemas")
        conn.execute("VACUUM")
        return int(n)

    def prune(self, max_size: int | None = None, older_than_s: float | None = None) -> int:
        """Evict down to ``max_size`` (default: the cache's) and entries not used for
        ``older_than_s`` seconds; returns how many were deleted."""
        conn = self._conn()
        gone = 0
        with _write(conn):
            if older_than_s is not None:
                gone += conn.execute("DELETE FROM entries WHERE accessed < ?",
                                     (time.time() - older_than_s,)).rowcount
            limit = max_size if max_size is not None else self.max_size
            if limit is not None:
                gone += self._evict(conn, limit)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone


def decode(schema: bytes, messages: list[bytes]) -> Any:
    """One Arrow table from a schema message and record-batch messages (one IPC stream)."""
    import pyarrow as pa

    buf = b"".join([schema, *messages, _EOS])
    return pa.ipc.open_stream(pa.py_buffer(buf)).read_all()


def encode(table: Any) -> tuple[bytes, list[bytes]]:
    """The schema message and one record-batch message per row of an Arrow table."""
    import pyarrow as pa

    schema = table.schema.serialize().to_pybytes()
    batch = pa.RecordBatch.from_arrays(
        [c.combine_chunks() for c in table.columns], schema=table.schema)
    return schema, [batch.slice(i, 1).serialize().to_pybytes() for i in range(batch.num_rows)]


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[None]:
    """One short write transaction (taken at once: no deadlock between readers upgrading)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _signed(a: np.ndarray) -> np.ndarray:
    """uint64 keys as the int64 SQLite stores."""
    return np.ascontiguousarray(a, dtype=np.uint64).view(np.int64)
