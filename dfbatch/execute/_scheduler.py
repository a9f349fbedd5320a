"""Which batch runs next: per-agent deques, work stealing, dynamic resizing, splitting, bisection.

Synchronous on purpose (no event loop, no clock): the pool asks ``take(agent)`` for work and
reports back with ``requeue`` / ``finished``; tests drive it with plain calls. Each agent's deque
is sorted heaviest first; an agent with an empty deque steals from the agent with the most
queued tokens. Under dynamic batching, ``take`` merges following pending batches or splits this
one to the sizer's target. A batch over ``token_limit`` is split in halves before it is sent, and
a failed multi-row batch is bisected so one poison row fails alone. Every new batch gets a new id.

Examples
--------
>>> import numpy as np
>>> from dfbatch import BatchConfig
>>> b = [Batch(0, 0, np.arange(4), tokens=40, nbytes=0), Batch(1, 0, np.arange(4, 6), 20, 0)]
>>> s = Scheduler([b, []], BatchConfig(request_overhead_tokens=0), row_tokens=np.full(6, 10))
>>> s.take(1).id, s.take(0).id, s.pending  # agent 1 steals the heaviest batch of agent 0
(0, 1, 2)
>>> [h.id for h in s.halves(b[0])], s.finished(), s.finished()
([2, 3], False, True)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dfbatch.config import BatchConfig
from dfbatch.execute._batches import Batch, Batches
from dfbatch.execute._sizing import BatchSizer

__all__ = ["Batch", "Batches", "Scheduler", "narrow"]

_BLOCK = 128  # planned batches whose fields are read at a time (the columns once for all)


class _Queue:
    """One agent's deque: batches made during the run (``front``), then the planned ones not
    yet taken: ``ready`` (the fields of the next few, last first: read ``_BLOCK`` at a time),
    then ``order[head:]`` (indices into the run's ``Batches``). A ``Batch`` object is built
    when its batch is taken."""

    __slots__ = ("front", "head", "order", "ready", "table")

    def __init__(self, table: Batches, order: np.ndarray) -> None:
        self.table, self.order, self.head = table, order, 0
        self.front: deque[Batch] = deque()
        self.ready: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.front) + len(self.ready) + len(self.order) - self.head

    def __bool__(self) -> bool:
        return bool(self.front or self.ready) or self.head < len(self.order)

    def __getitem__(self, i: int) -> Batch:  # only the head is ever looked at
        if i != 0 or not self:
            raise IndexError(i)
        if not self.front:
            self.front.append(self.popleft())
        return self.front[0]

    def popleft(self) -> Batch:
        if self.front:
            return self.front.popleft()
        ready = self.ready
        if not ready:
            head, order = self.head, self.order
            if head >= len(order):
                msg = "pop from an empty queue"
                raise IndexError(msg)
            self.head = min(head + _BLOCK, len(order))
            ready.extend(reversed(self.table.block(order[head:self.head])))
        return Batch(*ready.pop())

    def appendleft(self, batch: Batch) -> None:
        self.front.appendleft(batch)


_NONE = Batches.of([])


class Scheduler:
    """The queues of one run. ``pending`` counts batches queued or running; 0: all done."""

    def __init__(self, batches: Batches | Sequence[Sequence[Batch]], cfg: BatchConfig, *,
                 row_tokens: np.ndarray, row_bytes: np.ndarray | None = None,
                 sizer: BatchSizer | None = None,
                 rate_bound: Callable[[], bool] = lambda: False,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.row_tokens, self.row_bytes = row_tokens, row_bytes
        self.sizer, self.rate_bound, self.on_change = sizer, rate_bound, on_change
        table = Batches.of(batches)
        self.queues = [_Queue(table, order) for order in table.queues()]
        self.queued_load = table.load()
        self.pending = len(table)
        self.next_id = 1 + (int(table.ids.max()) if len(table) else -1)

    def release(self) -> None:
        """The run is over: drop the queues and the per-row arrays (the result is built next)."""
        self.queues = [_Queue(_NONE, np.zeros(0, np.int64)) for _ in self.queues]
        self.row_tokens, self.row_bytes = np.zeros(0, np.int64), None

    @property
    def n_agents(self) -> int:
        return len(self.queues)

    def queued(self) -> bool:
        """Is any batch still waiting in a deque?"""
        return any(self.queues)

    def take(self, a: int) -> Batch | None:
        """Next batch for agent ``a``: its own deque, else steal from the most loaded agent."""
        victim, q = a, self.queues[a]
        if not q:
            if not self.cfg.steal:
                return None
            victim = max(range(len(self.queues)), key=self.queued_load.__getitem__)
            q = self.queues[victim]
            if not q:
                return None
        batch = q.popleft()
        self.queued_load[victim] -= batch.tokens
        return batch if self.sizer is None else self._resize(victim, batch)

    def finished(self) -> bool:
        """One taken batch is over (done, failed, or split into queued parts); all done now?
        (``on_change`` is told when all are: a batch over queues none for idle agents.)"""
        self.pending -= 1
        if self.pending:
            return False
        self.on_change()
        return True

    def oversize(self, a: int, batch: Batch) -> str | None:
        """A batch over ``token_limit``: split it and requeue the halves (returns ``""``), or,
        a lone row, the error to record. ``None``: send it."""
        if batch.reject:
            return batch.reject
        if batch.tokens <= self.cfg.token_limit or batch.call_anyway:
            return None
        if len(batch.rows) > 1:
            self.requeue(a, self.halves(batch))
            return ""
        return (
            f"oversize: the request for this row needs {batch.tokens} tokens > "
            f"token_limit={self.cfg.token_limit}; raise token_limit, shorten the text, or pass "
            "oversize='truncate' or oversize='call'"
        )

    def requeue(self, a: int, batches: list[Batch]) -> None:
        """Put new batches at the front of agent ``a``'s deque (they run next)."""
        for b in reversed(batches):
            self.queues[a].appendleft(b)
            self.queued_load[a] += b.tokens
        self.pending += len(batches)
        self.on_change()

    def halves(self, batch: Batch) -> list[Batch]:
        """``batch`` cut in two (frozen: dynamic sizing never merges them back)."""
        mid = len(batch.rows) // 2
        halves = [self._new_batch(batch, batch.rows[:mid], _at(batch, 0)),
                  self._new_batch(batch, batch.rows[mid:], _at(batch, mid))]
        for half in halves:
            half.frozen = True
        return halves

    def _resize(self, qi: int, batch: Batch) -> Batch:
        """Apply the dynamic target size: merge following pending batches, or split this one."""
        assert self.sizer is not None
        self.sizer.rate_bound = self.rate_bound()
        target, n = self.sizer.target, len(batch.rows)
        # rows not yet sent (this batch's too), from the queued tokens at this batch's rate
        self.sizer.queued_rows = (sum(self.queued_load) + batch.tokens) * n / max(1, batch.tokens)
        if batch.call_anyway or batch.frozen or n == target or target == self.sizer.initial:
            return batch
        if n > target:
            rest = [self._new_batch(batch, batch.rows[i:i + target], _at(batch, i))
                    for i in range(target, n, target)]
            self.requeue(qi, rest)
            return self._new_batch(batch, batch.rows[:target], _at(batch, 0))
        q, parts, overhead = self.queues[qi], [batch.rows], self.cfg.request_overhead_tokens
        at = batch.at  # stays contiguous while each merged batch starts where the last ends
        tokens = batch.tokens
        while q and n + len(q[0].rows) <= target and not (q[0].call_anyway or q[0].frozen) and (
            tokens + q[0].tokens - overhead <= self.cfg.token_limit
        ):
            nxt = q.popleft()
            if at >= 0 and nxt.at != at + n:
                at = -1
            self.queued_load[qi] -= nxt.tokens
            self.pending -= 1  # merged into this batch
            parts.append(nxt.rows)
            tokens += nxt.tokens - overhead
            n += len(nxt.rows)
        return batch if len(parts) == 1 else self._new_batch(batch, np.concatenate(parts), at)

    def _new_batch(self, parent: Batch, rows: np.ndarray, at: int = -1) -> Batch:
        """A batch made of some rows of ``parent`` (split, bisected or merged), with a new id."""
        idx = slice(at, at + len(rows)) if at >= 0 else rows
        nbytes = int(self.row_bytes[idx].sum()) if self.row_bytes is not None else parent.nbytes
        self.next_id += 1
        return Batch(self.next_id - 1, parent.planned_agent, rows, self._tokens(idx, len(rows)),
                     nbytes, at=at, reject=parent.reject)

    def _tokens(self, idx: slice | np.ndarray, n: int) -> int:
        per_row = self.cfg.output_tokens_per_row
        return int(self.cfg.request_overhead_tokens + self.row_tokens[idx].sum() + per_row * n)


def _at(batch: Batch, offset: int) -> int:
    """Where a part of ``batch`` starting ``offset`` rows in begins (-1: scattered)."""
    return batch.at + offset if batch.at >= 0 else -1


def narrow(batches: Batches | Sequence[Sequence[Batch]], keep: np.ndarray, n: int,
           row_tokens: np.ndarray, row_bytes: np.ndarray, cfg: BatchConfig) -> Batches:
    """``batches`` over the rows ``keep`` of ``n`` only, renumbered to positions in ``keep``
    (``row_tokens`` / ``row_bytes`` are already of those rows): a batch that lost some rows
    is costed anew, one that lost all is dropped (a checkpoint or a cache holds them)."""
    return Batches.of(batches).narrow(keep, n, row_tokens, row_bytes,
                                      cfg.request_overhead_tokens, cfg.output_tokens_per_row)
