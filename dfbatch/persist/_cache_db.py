"""The response cache's SQLite store: the schema, transactions, finding keys and writing answers.

Tables: ``chunks`` (one write's answers: Arrow IPC ``data``, the rows' packed ``keys``,
``rows``, ``size``, ``accessed``), ``entries`` (key -> chunk, row, error; the primary key makes
every key stored once) and ``meta`` (total size and rows, kept by triggers). Invariant: a key
is in at most one chunk's ``keys`` (a row whose entry moved is blanked), so the keys of many
rows are found by reading the chunks' key blobs and joining them in polars (``scan``), and the
keys of a few by probing ``entries`` (``probe``); ``find`` picks the cheaper.

A dfbatch cache of an older layout (``PRAGMA user_version``) is emptied and rebuilt: its
answers miss. Any other database (or a newer dfbatch's cache) is refused, never touched.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dfbatch.errors import ConfigError
from dfbatch.persist import _cache_codec as codec
from dfbatch.persist import _cache_lru as lru

VERSION = 1
BUSY_MS = 60_000
ROW_BYTES = 48  # what an entry costs besides its share of a chunk
_PROBE = 50_000  # keys per probe statement
_SCAN_ROWS = 4_000_000  # stored keys joined at once by a scan (bounds its memory)
_SCAN_PER_KEY = 10  # a probe of one key costs about as much as scanning this many stored rows
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, data BLOB, keys BLOB NOT NULL, rows INTEGER NOT NULL,
    size INTEGER NOT NULL, accessed REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_accessed ON chunks (accessed);
CREATE TABLE IF NOT EXISTS entries (
    k1 INTEGER NOT NULL, k2 INTEGER NOT NULL, chunk INTEGER NOT NULL, idx INTEGER NOT NULL,
    error TEXT, PRIMARY KEY (k1, k2)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_chunk ON entries (chunk);
CREATE INDEX IF NOT EXISTS entries_errors ON entries (error) WHERE error IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('size', 0);
INSERT OR IGNORE INTO meta VALUES ('rows', 0);
CREATE TRIGGER IF NOT EXISTS size_ins AFTER INSERT ON chunks BEGIN
    UPDATE meta SET value = value + NEW.size WHERE name = 'size';
    UPDATE meta SET value = value + NEW.rows WHERE name = 'rows'; END;
CREATE TRIGGER IF NOT EXISTS size_del AFTER DELETE ON chunks BEGIN
    UPDATE meta SET value = value - OLD.size WHERE name = 'size';
    UPDATE meta SET value = value - OLD.rows WHERE name = 'rows'; END;
"""
_OLD = """
DROP TRIGGER IF EXISTS size_ins;
DROP TRIGGER IF EXISTS size_del;
DROP TABLE IF EXISTS entries;
DROP TABLE IF EXISTS chunks;
DROP TABLE IF EXISTS meta;
"""

Found = tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with the schema in place (autocommit: ``transaction``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        _wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB
        conn.execute("PRAGMA temp_store = MEMORY")
        with transaction(conn):  # (one transaction: another process never sees half a schema)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != VERSION:
                _check_ours(conn, path, version)
                for stmt in _statements(_OLD):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {VERSION}")
            for stmt in _statements(_SCHEMA):
                conn.execute(stmt)
    except BaseException:
        conn.close()
        raise
    return conn


def _wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting up to ``BUSY_MS`` for another process that holds the file (the
    switch needs it alone; SQLite answers "database is locked" at once, without its busy
    handler, while another connection creates the schema of a new file)."""
    deadline = time.monotonic() + BUSY_MS / 1000
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(0.1, 2 * pause)
        else:
            return


def _check_ours(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Only an empty file or a dfbatch cache of an older layout is rebuilt: never a newer
    dfbatch's cache, nor another program's database (its tables would be dropped)."""
    if version > VERSION:
        msg = (f"cache {str(path)!r} was written by a newer dfbatch (layout {version}, this one "
               f"reads {VERSION}); upgrade dfbatch, or pass another cache= path")
        raise ConfigError(msg)
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return
    columns = {name: {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}
               for name in tables & {"chunks", "entries", "meta"}}
    ours = (tables <= {"chunks", "entries", "meta"}
            and {"data", "size", "accessed"} <= columns.get("chunks", set())
            and {"k1", "k2"} <= columns.get("entries", {"k1", "k2"}))
    if not ours:
        msg = (f"{str(path)!r} is not a dfbatch cache (it holds the tables "
               f"{sorted(tables)[:5]}); pass cache= a new file or a dfbatch cache")
        raise ConfigError(msg)


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` (a trigger's body, with its own ';', stays whole)."""
    stmt = ""
    for line in script.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):
            yield stmt
            stmt = ""


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One short transaction; a write one is taken at once (no deadlock between readers
    upgrading to writers). ``begin="BEGIN"``: a read snapshot."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def signed(a: np.ndarray) -> np.ndarray:
    """uint64 keys as the int64 SQLite stores."""
    return np.ascontiguousarray(a, dtype=np.uint64).view(np.int64)


# -- finding keys (inside a transaction) ---------------------------------------------------------
def find(conn: sqlite3.Connection, a: np.ndarray, b: np.ndarray) -> Found:
    """Which of the keys (int64 halves) are stored: (positions, chunks, rows, {pos: error})."""
    stored = int(conn.execute("SELECT value FROM meta WHERE name = 'rows'").fetchone()[0])
    if len(a) * _SCAN_PER_KEY >= stored:
        return scan(conn, a, b)
    return probe(conn, a, b)


def probe(conn: sqlite3.Connection, a: np.ndarray, b: np.ndarray) -> Found:
    """``find`` by looking each key up in ``entries`` (in key order: the B-tree is walked)."""
    order = np.lexsort((b, a))
    rows: list[tuple[int, int, int, str | None]] = []
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS q (k1 INTEGER, k2 INTEGER, pos INTEGER)")
    for s in range(0, len(a), _PROBE):
        part = order[s:s + _PROBE]
        conn.execute("DELETE FROM temp.q")
        conn.executemany("INSERT INTO temp.q VALUES (?, ?, ?)",
                         zip(a[part].tolist(), b[part].tolist(), part.tolist(), strict=True))
        rows += conn.execute("SELECT q.pos, e.chunk, e.idx, e.error FROM temp.q q "
                             "JOIN entries e ON e.k1 = q.k1 AND e.k2 = q.k2")
    got = np.array([r[:3] for r in rows], np.int64).reshape(-1, 3)
    return got[:, 0], got[:, 1], got[:, 2], {r[0]: r[3] for r in rows if r[3] is not None}


def scan(conn: sqlite3.Connection, a: np.ndarray, b: np.ndarray) -> Found:
    """``find`` by reading every chunk's keys and joining them with the query in polars."""
    query = pl.DataFrame({"k1": a, "k2": b, "pos": np.arange(len(a), dtype=np.int64)})
    parts: list[pl.DataFrame] = []
    batch: list[tuple[int, bytes]] = []
    held = 0
    for chunk_id, keys in itertools.chain(conn.execute("SELECT id, keys FROM chunks"),
                                          [(None, None)]):
        if chunk_id is not None:
            batch.append((chunk_id, keys))
            held += len(keys) // 16
        if batch and (held >= _SCAN_ROWS or chunk_id is None):
            parts.append(query.join(_stored(batch), on="k1", how="inner")  # (one column:
                         .filter(pl.col("k2") == pl.col("k2_right")).drop("k2_right"))  # 2x)
            batch, held = [], 0
    hits = pl.concat(parts) if parts else pl.DataFrame(
        schema={"k1": pl.Int64, "k2": pl.Int64, "pos": pl.Int64, "chunk": pl.Int64,
                "idx": pl.Int64})
    errs: dict[int, str] = {}
    if conn.execute("SELECT 1 FROM entries WHERE error IS NOT NULL LIMIT 1").fetchone():
        stored = pl.DataFrame(conn.execute("SELECT k1, k2, error FROM entries "
                                           "WHERE error IS NOT NULL").fetchall(),
                              schema={"k1": pl.Int64, "k2": pl.Int64, "error": pl.String},
                              orient="row")
        bad = hits.join(stored, on=["k1", "k2"], how="inner")
        errs = dict(zip(bad["pos"].to_list(), bad["error"].to_list(), strict=True))
    return (hits["pos"].to_numpy(), hits["chunk"].to_numpy(), hits["idx"].to_numpy(), errs)


def _stored(batch: list[tuple[int, bytes]]) -> pl.DataFrame:
    """The live keys of some chunks: k1, k2, chunk, idx (blanked rows left out)."""
    halves = [codec.unpack_keys(keys) for _, keys in batch]
    sizes = [len(k1) for k1, _ in halves]
    frame = pl.DataFrame({
        "k1": np.concatenate([k1 for k1, _ in halves]),
        "k2": np.concatenate([k2 for _, k2 in halves]),
        "chunk": np.repeat(np.array([i for i, _ in batch], np.int64), sizes),
        "idx": np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])})
    return frame.filter((pl.col("k1") != 0) | (pl.col("k2") != 0))


def blobs(conn: sqlite3.Connection, ids: np.ndarray) -> dict[int, bytes | None]:
    """The Arrow data of chunks (None: errors only)."""
    out: dict[int, bytes | None] = {}
    id_list = np.unique(ids).tolist()
    for s in range(0, len(id_list), 500):
        part = id_list[s:s + 500]
        marks = ",".join("?" * len(part))
        out.update(conn.execute(f"SELECT id, data FROM chunks WHERE id IN ({marks})", part))
    return out


# -- writing (inside a write transaction) --------------------------------------------------------
def put(conn: sqlite3.Connection, a: np.ndarray, b: np.ndarray, table: Any,
        errors: list[str | None], *, overwrite: bool) -> None:
    """Store one group of answers (row i of ``table`` for key i; None: every row failed).

    A key already stored is kept unless ``overwrite``, or it holds an error and the new entry
    an answer; a key twice in the group is stored once (its answer before its error). New
    keys (the usual case) cost one insert each; keys stored before are settled after."""
    failed = np.array([e is not None for e in errors], bool)
    order = np.lexsort((failed, b, a))
    first = np.ones(len(order), bool)
    first[1:] = (a[order][1:] != a[order][:-1]) | (b[order][1:] != b[order][:-1])
    keep = np.sort(order[first])
    if table is not None and len(keep) < len(a):
        import pyarrow as pa

        table = table.take(pa.array(keep))
    a, b, failed, errors = a[keep], b[keep], failed[keep], [errors[i] for i in keep.tolist()]
    data = None if table is None else codec.encode(table)
    size = (len(data) if data is not None else 0) + ROW_BYTES * len(keep)
    chunk = conn.execute(
        "INSERT INTO chunks (data, keys, rows, size, accessed) VALUES (?, ?, ?, ?, ?)",
        (data, codec.pack_keys(a, b), len(keep), size, time.time())).lastrowid
    before = conn.total_changes
    conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     zip(a.tolist(), b.tolist(), itertools.repeat(chunk), range(len(keep)),
                         errors))
    if conn.total_changes - before == len(keep):
        return
    pos, old_chunk, old_idx, old_errs = probe(conn, a, b)  # some keys were stored before
    other = old_chunk != chunk
    pos, old_chunk, old_idx = pos[other], old_chunk[other], old_idx[other]
    was_error = np.array([p in old_errs for p in pos.tolist()], bool)
    replace = overwrite | (was_error & ~failed[pos])
    _unlink(conn, old_chunk[replace], old_idx[replace])
    conn.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?, ?) ON CONFLICT (k1, k2) DO UPDATE SET "
        "chunk = excluded.chunk, idx = excluded.idx, error = excluded.error",
        [(int(a[i]), int(b[i]), chunk, i, errors[i]) for i in pos[replace].tolist()])
    _unlink(conn, np.full(int((~replace).sum()), chunk), pos[~replace])  # (kept elsewhere)


def _unlink(conn: sqlite3.Connection, chunks: np.ndarray, rows: np.ndarray) -> None:
    """Blank the keys of rows whose entries are elsewhere; drop a chunk left without any."""
    for chunk_id in np.unique(chunks).tolist():
        (keys,) = conn.execute("SELECT keys FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        keys = codec.blank(keys, rows[chunks == chunk_id])
        if not np.frombuffer(keys, "<i8").any():
            lru.drop(conn, [chunk_id])  # (its entries, if any, are about to move)
        else:
            conn.execute("UPDATE chunks SET keys = ? WHERE id = ?", (keys, chunk_id))
