"""The response cache's eviction policy: least recently used chunks go first.

A chunk (the answers of one write, ``dfbatch.persist._cache_codec``) has a ``size`` (its bytes
plus a fixed cost per row) and an ``accessed`` time. A write that takes the total past
``max_size`` evicts the least recently used chunks, and their entries, down to 90% of it; a
lookup hit refreshes its chunk's ``accessed`` time (in one statement per 500 chunks, and at
most once a minute per chunk, so a rerun does not rewrite the file). Every function here runs
inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
import time

import numpy as np

FRESH_S = 60.0  # a chunk used less than this long ago is not touched again
LOW_WATER = 0.9  # eviction goes down to this share of max_size


def touch(conn: sqlite3.Connection, chunks: np.ndarray) -> None:
    """Mark ``chunks`` (ids) used now."""
    now = time.time()
    ids = np.unique(chunks).tolist()
    for s in range(0, len(ids), 500):
        part = ids[s:s + 500]
        marks = ",".join("?" * len(part))
        conn.execute(f"UPDATE chunks SET accessed = ? WHERE id IN ({marks}) AND accessed < ?",
                     (now, *part, now - FRESH_S))


def size(conn: sqlite3.Connection) -> int:
    """Bytes of stored chunks (kept by triggers)."""
    return int(conn.execute("SELECT value FROM meta WHERE name = 'size'").fetchone()[0])


def evict(conn: sqlite3.Connection, limit: int) -> int:
    """Delete the least recently used chunks (and their entries) until the size is <= 90% of
    ``limit``; returns how many entries went."""
    now, target, gone = size(conn), int(limit * LOW_WATER), 0
    while now > target:
        old = conn.execute("SELECT id, size FROM chunks ORDER BY accessed, id LIMIT 64"
                           ).fetchall()
        if not old:
            break
        ids = []
        for i, n in old:
            if now <= target:
                break
            ids.append(i)
            now -= n
        gone += drop(conn, ids)
    return gone


def drop_older(conn: sqlite3.Connection, older_than_s: float) -> int:
    """Delete the chunks not used for ``older_than_s`` seconds; returns how many entries went."""
    cut = time.time() - older_than_s
    ids = [i for (i,) in conn.execute("SELECT id FROM chunks WHERE accessed < ?", (cut,))]
    return sum(drop(conn, ids[s:s + 500]) for s in range(0, len(ids), 500))


def drop(conn: sqlite3.Connection, ids: list[int]) -> int:
    """Delete chunks and their entries; returns how many entries went."""
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))
    gone = int(conn.execute(f"DELETE FROM entries WHERE chunk IN ({marks})", ids).rowcount)
    conn.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
    return gone
