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
chunk, its row in it, its error) points into it (``dfbatch.persist._cache_db``, ``_cache_codec``).
A lookup of many keys reads the chunks' packed keys and joins them in polars; of a few, it
probes the entries.

**Size.** ``max_size`` bounds the bytes of stored outputs (default 2 GiB; None: unbounded);
when a write passes it, the least recently used chunks and their entries are evicted down to
90% of it (a hit refreshes its chunk's ``accessed`` time, at most once a minute;
``dfbatch.persist._cache_lru``).
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

import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dfbatch.errors import ConfigError
from dfbatch.persist import _cache_db as db
from dfbatch.persist import _cache_lru as lru
from dfbatch.persist._cache_codec import gather

DEFAULT_MAX_SIZE = 2 * 1024**3


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

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are per thread)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = db.connect(self.path)
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

    def lookup(self, k1: np.ndarray, k2: np.ndarray, *, errors: bool = False,
               touch: bool = True, values: bool = True,
               ) -> tuple[np.ndarray, list[tuple[np.ndarray, Any]], dict[int, str]]:
        """Which keys are stored: (hit positions, [(positions, Arrow table)], {pos: error}).

        Entries that hold an error count only with ``errors=True``. Hits are touched (LRU,
        in bulk). ``values=False``: only the positions (nothing decoded).
        """
        conn = self._conn()
        with db.transaction(conn, "BEGIN"):  # one snapshot: keys and data agree
            pos, chunk, idx, errs = db.find(conn, db.signed(k1), db.signed(k2))
            if errs and not errors:
                keep = np.array([p not in errs for p in pos.tolist()], bool)
                pos, chunk, idx, errs = pos[keep], chunk[keep], idx[keep], {}
            pieces = (gather(db.blobs(conn, chunk), pos, chunk, idx)
                      if values and len(pos) else [])
        if touch and len(pos):
            with db.transaction(conn):
                lru.touch(conn, chunk)
        return np.sort(pos), pieces, errs

    def store(self, k1: np.ndarray, k2: np.ndarray, table: Any, errors: Sequence[str | None],
              *, overwrite: bool = False) -> None:
        """Store one group of answers (one Arrow table, row i for key i, or None when every
        row failed) in one short transaction; an existing key is kept unless ``overwrite`` or
        it holds an error and the new entry an answer."""
        conn = self._conn()
        with db.transaction(conn):
            db.put(conn, db.signed(k1), db.signed(k2), table, list(errors), overwrite=overwrite)
            if self.max_size is not None:
                lru.evict(conn, self.max_size)

    # -- maintenance (the CLI) ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Entries, errors stored, bytes of outputs, file bytes, bounds, oldest/newest access."""
        conn = self._conn()
        n, errs = conn.execute("SELECT count(*), count(error) FROM entries").fetchone()
        old, new = conn.execute("SELECT min(accessed), max(accessed) FROM chunks").fetchone()
        files = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*")
                    if p.is_file())
        return {"path": str(self.path), "entries": n, "errors": errs,
                "size": lru.size(conn), "file_size": files, "max_size": self.max_size,
                "oldest_access": old, "newest_access": new}

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        conn = self._conn()
        with db.transaction(conn):
            n = conn.execute("DELETE FROM entries").rowcount
            conn.execute("DELETE FROM chunks")
        conn.execute("VACUUM")
        return int(n)

    def prune(self, max_size: int | None = None, older_than_s: float | None = None) -> int:
        """Evict down to ``max_size`` (default: the cache's) and entries not used for
        ``older_than_s`` seconds; returns how many were deleted."""
        conn = self._conn()
        gone = 0
        with db.transaction(conn):
            if older_than_s is not None:
                gone += lru.drop_older(conn, older_than_s)
            limit = max_size if max_size is not None else self.max_size
            if limit is not None:
                gone += lru.evict(conn, limit)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone
