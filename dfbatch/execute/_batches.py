"""A run's batches: ``Batch`` (one batch in flight) and ``Batches`` (all of them, as columns).

A plan of a million rows has hundreds of thousands of batches; a Python object each would cost
more memory than the rows. So the run holds its batches as numpy columns (``Batches``: ids,
planned agents, tokens, bytes, flags and the offsets of each batch's rows) and builds a
``Batch`` only when the scheduler hands one out (its fields read for a block of the next
batches at once, ``Batches.block``); it is dropped when done.

Examples
--------
>>> import numpy as np
>>> t = Batches.of([[Batch(0, 0, np.array([2, 0]), 7, 0)], [Batch(1, 1, np.arange(3, 5), 9, 0)]])
>>> len(t), t.n_agents, [b.rows.tolist() for b in t.lists()[1]]
(2, 2, [[3, 4]])
>>> t.contiguous().batch(1)  # its rows are now positions 2..4 of the reordered frame
Batch(id=1, planned_agent=1, rows=array([2, 3]), tokens=9, nbytes=0, call_anyway=False, \
frozen=False, at=2, reject=None)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CALL_ANYWAY, FROZEN = 1, 2  # flag bits


@dataclass(slots=True)
class Batch:
    """Rows (positions in the frame) that go to fn in one call.

    ``at`` >= 0: the rows are the contiguous range ``at .. at + len(rows)`` (the pool cuts them
    as a zero-copy slice and stamps outcomes through ``index``, a basic slice); -1: scattered.
    """

    id: int
    planned_agent: int
    rows: np.ndarray
    tokens: int  # request tokens: overhead + row tokens + expected output
    nbytes: int
    call_anyway: bool = False  # a single oversize row sent under oversize="call"
    frozen: bool = False  # made by bisection: dynamic sizing never merges it back
    at: int = -1
    reject: str | None = None  # rows that get this error value without a call (null texts)
    tries: int = field(default=0, repr=False, compare=False)  # attempts not yet stamped

    @property
    def index(self) -> slice | np.ndarray:
        """What indexes this batch's rows in per-row arrays: a slice where contiguous."""
        return slice(self.at, self.at + len(self.rows)) if self.at >= 0 else self.rows


@dataclass(slots=True)
class Batches:
    """Every batch of a run as columns, in batch-id order (so a frame planned in order needs
    no reordering); batch ``i``'s rows are ``rows[bounds[i]:bounds[i+1]]`` (``rows`` None: the
    range itself, a contiguous run of the frame). ``queue_of``: the agent whose queue holds the
    batch (``agents``: its planned agent, most often the same array). ``reject`` (None: no
    batch) holds the error text of the batches whose rows are never sent."""

    n_agents: int
    queue_of: np.ndarray
    ids: np.ndarray
    agents: np.ndarray
    tokens: np.ndarray
    nbytes: np.ndarray
    flags: np.ndarray
    bounds: np.ndarray
    rows: np.ndarray | None = None
    reject: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, batches: Batches | Sequence[Sequence[Batch]]) -> Batches:
        """``batches`` as a table (lists of ``Batch`` per agent: as written by hand, in tests)."""
        if isinstance(batches, Batches):
            return batches
        flat = [b for q in batches for b in q]
        sizes = np.array([len(b.rows) for b in flat], np.int64)
        rejects = [b.reject for b in flat]
        flags = np.array([CALL_ANYWAY * b.call_anyway + FROZEN * b.frozen for b in flat], np.uint8)
        return cls(
            len(batches), np.repeat(np.arange(len(batches)), [len(q) for q in batches]),
            np.array([b.id for b in flat], np.int64),
            np.array([b.planned_agent for b in flat], np.int64),
            np.array([b.tokens for b in flat], np.int64),
            np.array([b.nbytes for b in flat], np.int64),
            flags, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            np.concatenate([b.rows for b in flat]).astype(np.int64) if flat else
            np.zeros(0, np.int64),
            np.array(rejects, object) if any(r is not None for r in rejects) else None)

    def batch(self, i: int) -> Batch:
        """Batch ``i`` as an object (built when it is handed out)."""
        start, stop = self.bounds.item(i), self.bounds.item(i + 1)
        f = self.flags.item(i)
        if self.rows is None:
            rows, at = np.arange(start, stop), start  # (no row array held for the run)
        else:
            rows, at = self.rows[start:stop], -1
        return Batch(self.ids.item(i), self.agents.item(i), rows, self.tokens.item(i),
                     self.nbytes.item(i), bool(f & CALL_ANYWAY), bool(f & FROZEN), at,
                     None if self.reject is None else self.reject[i])

    def block(self, idx: np.ndarray) -> list[tuple[Any, ...]]:
        """The fields of batches ``idx`` (``Batch(*fields)``), read from the columns once for
        all of them (a ``Batch`` object is built only when its batch is handed out)."""
        first, last = self.bounds[idx], self.bounds[idx + 1]
        starts = first.tolist()
        if self.rows is None:  # (no row array held for the run: one made for the block)
            sizes = last - first
            ends = np.cumsum(sizes)
            pos = np.repeat(first - (ends - sizes), sizes) + np.arange(ends[-1] if len(ends) else 0)
            cuts = np.concatenate([[0], ends]).tolist()
            rows = [pos[a:b] for a, b in itertools.pairwise(cuts)]
            at = starts
        else:
            rows = [self.rows[a:b] for a, b in zip(starts, last.tolist(), strict=True)]
            at = [-1] * len(starts)
        reject = [None] * len(starts) if self.reject is None else self.reject[idx].tolist()
        flags = self.flags[idx].tolist()
        return list(zip(self.ids[idx].tolist(), self.agents[idx].tolist(), rows,
                        self.tokens[idx].tolist(), self.nbytes[idx].tolist(),
                        [bool(f & CALL_ANYWAY) for f in flags], [bool(f & FROZEN) for f in flags],
                        at, reject, strict=True))

    def lists(self) -> list[list[Batch]]:
        """Per agent, its batches as objects (for tests and small runs)."""
        out: list[list[Batch]] = [[] for _ in range(self.n_agents)]
        for i, q in enumerate(self.queue_of.tolist()):
            out[q].append(self.batch(i))
        return out

    def queues(self) -> list[np.ndarray]:
        """Per agent, its batches (indices) heaviest first (ties: lowest id first)."""
        q = self.queue_of
        order = np.lexsort((self.ids, -self.tokens, q))
        cuts = np.searchsorted(q[order], np.arange(1, self.n_agents))
        return np.split(order, cuts)

    def load(self) -> list[int]:
        """Per agent, the request tokens of its batches."""
        return np.bincount(self.queue_of, self.tokens, self.n_agents).astype(np.int64).tolist()

    def row_order(self) -> np.ndarray:
        """Every row of every batch, batch after batch (positions in the frame)."""
        return np.arange(self.bounds[-1]) if self.rows is None else self.rows

    def contiguous(self) -> Batches:
        """These batches renumbered to ranges of the frame reordered by ``row_order()``."""
        return Batches(self.n_agents, self.queue_of, self.ids, self.agents, self.tokens,
                       self.nbytes, self.flags, self.bounds, None, self.reject)

    def narrow(self, keep: np.ndarray, n: int, row_tokens: np.ndarray, row_bytes: np.ndarray,
               overhead: int, per_row: int) -> Batches:
        """These batches over the rows ``keep`` of ``n`` only, renumbered to positions in
        ``keep`` (``row_tokens`` / ``row_bytes`` are already of those rows): a batch that lost
        some rows is costed anew, one that lost all is dropped."""
        new_pos = np.full(n, -1, np.int64)
        new_pos[keep] = np.arange(len(keep))
        moved = new_pos[self.row_order()]
        kept = moved >= 0
        rows = moved[kept]
        at = np.concatenate([[0], np.cumsum(kept)])[self.bounds]
        sizes, old = np.diff(at), np.diff(self.bounds)
        tok = np.concatenate([[0], np.cumsum(row_tokens[rows])])[at]
        nb = np.concatenate([[0], np.cumsum(row_bytes[rows])])[at]
        lost = sizes < old
        tokens = np.where(lost, overhead + np.diff(tok) + per_row * sizes, self.tokens)
        nbytes = np.where(lost, np.diff(nb), self.nbytes)
        live = sizes > 0
        return Batches(self.n_agents, self.queue_of[live], self.ids[live], self.agents[live],
                       tokens[live], nbytes[live], self.flags[live],
                       np.concatenate([[0], np.cumsum(sizes[live])]).astype(np.int64), rows,
                       None if self.reject is None else self.reject[live])
