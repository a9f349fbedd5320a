"""The response cache's store: bulk lookups (key blobs joined in polars) agree with probes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import dfbatch
from dfbatch.persist import _cache_db as db


def keys(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(lo, hi, dtype=np.uint64)
    return i * np.uint64(0x9E3779B97F4A7C15), i + np.uint64(1)


def answers(lo: int, hi: int, tag: str = "") -> pa.Table:
    return pa.table({"output": [f"{tag}{i}" for i in range(lo, hi)]})


def filled(path: Path) -> dfbatch.Cache:
    """0..999 answered (in 4 writes), 1000..1009 errors, 500..509 refreshed, and a write
    whose keys are all stored already."""
    cache = dfbatch.Cache(path, max_size=None)
    for lo in range(0, 1000, 250):
        cache.store(*keys(lo, lo + 250), answers(lo, lo + 250), [None] * 250)
    cache.store(*keys(1000, 1010), None, ["boom"] * 10)
    cache.store(*keys(500, 510), answers(500, 510, "new"), [None] * 10, overwrite=True)
    cache.store(*keys(0, 10), answers(0, 10, "dup"), [None] * 10)
    return cache


def found(f: db.Found) -> tuple[list[tuple[int, int, int]], dict[int, str]]:
    pos, chunk, idx, errs = f
    return sorted(zip(pos.tolist(), chunk.tolist(), idx.tolist(), strict=True)), errs


def test_scan_and_probe_find_the_same_entries(tmp_path: Path) -> None:
    cache = filled(tmp_path / "c.sqlite")
    k1, k2 = keys(0, 1200)  # 1010 stored, 190 not
    a, b = db.signed(k1), db.signed(k2)
    conn = cache._conn()
    with db.transaction(conn, "BEGIN"):
        scanned, probed = found(db.scan(conn, a, b)), found(db.probe(conn, a, b))
    assert scanned == probed
    assert len(scanned[0]) == 1010 and sorted(scanned[1]) == list(range(1000, 1010))


def test_a_refreshed_key_is_found_once_with_its_new_answer(tmp_path: Path) -> None:
    cache = filled(tmp_path / "c.sqlite")
    hits, pieces, errs = cache.lookup(*keys(0, 1010), errors=True)  # (a scan: many keys)
    assert hits.tolist() == list(range(1010)) and sorted(errs) == list(range(1000, 1010))
    got = {int(p): v for rows, t in pieces for p, v in zip(rows, t["output"].to_pylist(),
                                                           strict=True)}
    assert [got[i] for i in (0, 499, 500, 509, 510)] == ["0", "499", "new500", "new509", "510"]
    assert cache.info()["entries"] == 1010
    chunks = cache._conn().execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert chunks == 6  # (the write of keys all stored already left no chunk)
    few, pieces, _ = cache.lookup(*keys(505, 506))  # (a probe: one key)
    assert few.tolist() == [0] and pieces[0][1]["output"].to_pylist() == ["new505"]


def test_a_key_twice_in_one_write_is_stored_once(tmp_path: Path) -> None:
    cache = dfbatch.Cache(tmp_path / "c.sqlite")
    k1, k2 = keys(0, 3)
    twice = (np.concatenate([k1, k1]), np.concatenate([k2, k2]))
    cache.store(*twice, pa.table({"output": ["e", "b", "c", "a", "x", "y"]}),
                ["bad", None, None, None, None, None])
    hits, pieces, errs = cache.lookup(*twice, errors=True)
    assert hits.tolist() == list(range(6)) and errs == {}
    assert sorted(pieces[0][1]["output"].to_pylist()) == ["a", "a", "b", "b", "c", "c"]
    assert cache.info()["entries"] == 3


def test_a_bulk_lookup_runs_a_few_statements_not_one_per_key(tmp_path: Path) -> None:
    cache = filled(tmp_path / "c.sqlite")
    statements: list[str] = []
    cache._conn().set_trace_callback(statements.append)
    hits, _, _ = cache.lookup(*keys(0, 1000))
    assert len(hits) == 1000 and len(statements) < 20


def test_a_cache_file_of_the_first_layout_is_rebuilt_empty(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE chunks (id INTEGER PRIMARY KEY, data BLOB, size INTEGER "
                     "NOT NULL, accessed REAL NOT NULL)")
        conn.execute("INSERT INTO chunks VALUES (1, NULL, 0, 0)")
    cache = dfbatch.Cache(path)
    assert cache.info()["entries"] == 0
    cache.store(*keys(0, 5), answers(0, 5), [None] * 5)
    assert len(cache.lookup(*keys(0, 5))[0]) == 5


@pytest.mark.parametrize("n", [0, 1])
def test_lookups_of_nothing_and_of_an_empty_cache(tmp_path: Path, n: int) -> None:
    cache = dfbatch.Cache(tmp_path / "c.sqlite")
    hits, pieces, errs = cache.lookup(*keys(0, n))
    assert hits.tolist() == [] and pieces == [] and errs == {}


def test_a_bulk_lookup_hit_refreshes_its_chunk_for_eviction(tmp_path: Path) -> None:
    cache = dfbatch.Cache(tmp_path / "c.sqlite", max_size=None)
    for lo in (0, 100, 200):  # three chunks, written long ago, oldest first
        cache.store(*keys(lo, lo + 100), answers(lo, lo + 100), [None] * 100)
    conn = cache._conn()
    conn.execute("UPDATE chunks SET accessed = id")
    hits, _, _ = cache.lookup(*keys(0, 100))  # the oldest chunk is used (a scan: 100 keys)
    assert len(hits) == 100
    one = conn.execute("SELECT size FROM chunks LIMIT 1").fetchone()[0]
    cache.prune(max_size=int(2.2 * one / 0.9))  # room for two chunks: one goes
    assert len(cache.lookup(*keys(0, 100))[0]) == 100  # the used one stayed ...
    assert len(cache.lookup(*keys(100, 200))[0]) == 0  # ... the least recently used went
    assert len(cache.lookup(*keys(200, 300))[0]) == 100


def test_another_programs_database_is_refused_and_left_whole(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO entries (name) VALUES (?)", [(f"n{i}",) for i in range(100)])
    conn.execute("CREATE TABLE meta (k TEXT, v TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(dfbatch.ConfigError, match="is not a dfbatch cache"):
        dfbatch.Cache(path).info()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 100  # untouched
    conn.close()


def test_a_newer_dfbatchs_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {db.VERSION + 1}")
    conn.execute("CREATE TABLE future (x)")
    conn.commit()
    conn.close()
    with pytest.raises(dfbatch.ConfigError, match="newer dfbatch"):
        dfbatch.Cache(path).info()
