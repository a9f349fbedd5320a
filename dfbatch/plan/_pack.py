"""Packing: split rows into batches under a row cap and a token limit. Pure, vectorized numpy.

Algorithm. Rows are split into size classes: class ``k`` holds rows that fit ``k`` to a batch
(``limit / (k + 1) < cost <= limit / k``); a row with ``cost > limit`` is oversize and sits
alone. Each class is chunked in input order, then the free slots of the big rows' batches are
filled with the smallest rows (matching the ``t`` smallest rows to the ``t`` largest slots, ``t``
found by bisection). The remaining small rows are chunked ``items_per_batch`` at a time. Batch
ids are renumbered ``0..B-1`` in order of each batch's first row.

Examples
--------
>>> from dfbatch.plan._pack import pack
>>> pack([5, 1, 1, 9, 1, 1, 1, 12], items_per_batch=3, limit=10).tolist()
[0, 1, 0, 1, 0, 2, 2, 3]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dfbatch.errors import ConfigError


def pack(costs: Any, items_per_batch: int, limit: int) -> np.ndarray:
    """Pack rows into batches: ``<= items_per_batch`` rows and ``sum(costs) <= limit`` each.

    A row with ``cost > limit`` is alone in its batch. Rows are split into size classes (class
    ``k`` holds rows that fit ``k`` to a batch: ``limit / (k + 1) < cost <= limit / k``) and each
    class is chunked in input order; the free slots of the batches of big rows are then filled
    with the smallest rows. Batch ids are ``0..B-1`` in order of each batch's first row.

    Examples
    --------
    >>> from dfbatch.plan import pack
    >>> pack([5, 1, 1, 9, 1, 1, 1, 12], items_per_batch=3, limit=10).tolist()
    [0, 1, 0, 1, 0, 2, 2, 3]
    """
    c = np.asarray(costs, dtype=np.int64)
    if items_per_batch < 1 or limit < 1:
        msg = f"items_per_batch and limit must be >= 1, got {items_per_batch} and {limit}"
        raise ConfigError(msg)
    if c.ndim != 1 or (len(c) and c.min() < 0):
        msg = "costs must be a 1-d array of non-negative integers"
        raise ConfigError(msg)
    n = len(c)
    # rows per batch of each row's class, built in one buffer (a million-row plan: 8 MB, not 40)
    size = np.maximum(c, 1)
    np.floor_divide(limit, size, out=size)
    np.minimum(size, items_per_batch, out=size)
    size[c == 0] = items_per_batch
    kind = np.int32 if n < 2**31 else np.int64  # (group ids < n: half the memory)
    group = np.empty(n, dtype=kind)
    big = np.flatnonzero(size < items_per_batch)  # oversize (size 0) and classes 1..ipb-1
    n_groups, open_groups = _chunk_big(c, size, big, group, items_per_batch, limit)
    del big
    small = np.flatnonzero(size == items_per_batch)
    del size
    rest = _fill_open(c, small, open_groups, group)
    del small
    group[rest] = n_groups + np.arange(len(rest), dtype=kind) // items_per_batch
    del rest
    return _renumber_by_first_row(group)


def _chunk_big(
    c: np.ndarray, size: np.ndarray, big: np.ndarray, group: np.ndarray, ipb: int, limit: int
) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Chunk the rows of classes ``0..ipb-1`` in input order; return their open slots."""
    k = size[big]
    order = np.argsort(k, kind="stable")
    rows, k = big[order], k[order]
    rank = np.arange(len(k)) - np.searchsorted(k, k, side="left")
    starts = np.flatnonzero(rank % np.maximum(k, 1) == 0)
    gid = np.cumsum(rank % np.maximum(k, 1) == 0) - 1
    group[rows] = gid
    if len(starts) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return 0, (empty, empty, empty)
    count = np.diff(np.append(starts, len(k)))
    slack = limit - np.add.reduceat(c[rows], starts)
    free = np.where(k[starts] == 0, 0, ipb - count)  # oversize batches stay alone
    return len(starts), (np.arange(len(starts)), free, np.maximum(slack, 0))


def _fill_open(
    c: np.ndarray,
    small: np.ndarray,
    open_groups: tuple[np.ndarray, np.ndarray, np.ndarray],
    group: np.ndarray,
) -> np.ndarray:
    """Move the smallest class-``ipb`` rows into free slots of big-row batches; return the rest.

    A batch with ``f`` free slots and ``s`` free tokens offers slots of budget ``s // f``, so
    any rows that each fit a slot fit the batch together. The most rows are placed by matching
    the ``t`` smallest rows to the ``t`` largest slots, ``t`` found by bisection.
    """
    gids, free, slack = open_groups
    if len(small) == 0 or len(gids) == 0 or free.sum() == 0:
        return small
    c_small = c[small]
    cap = max(1, -(-4 * len(small) // len(gids)))  # bounds the slot count to O(rows)
    free = np.minimum(free, np.minimum(slack // max(int(c_small.min()), 1), cap))
    budget = slack // np.maximum(free, 1)
    slot_group = np.repeat(gids, free)
    slot_budget = np.repeat(budget, free)
    by_budget = np.argsort(slot_budget, kind="stable")
    slot_group, slot_budget = slot_group[by_budget], slot_budget[by_budget]
    by_cost = small[np.argsort(c_small, kind="stable")]
    cost_sorted = c[by_cost]
    lo, hi = 0, min(len(slot_budget), len(small))
    while lo < hi:  # bisection over t: log2(rows) vectorized checks
        t = (lo + hi + 1) // 2
        if np.all(cost_sorted[:t] <= slot_budget[len(slot_budget) - t :]):
            lo = t
        else:
            hi = t - 1
    if lo == 0:
        return small
    group[by_cost[:lo]] = slot_group[len(slot_group) - lo :]
    return np.sort(by_cost[lo:])


def _renumber_by_first_row(group: np.ndarray) -> np.ndarray:
    n_groups = int(group.max()) + 1 if len(group) else 0
    first = np.full(n_groups, len(group), dtype=np.int64)
    np.minimum.at(first, group, np.arange(len(group), dtype=group.dtype))
    rank = np.empty(n_groups, dtype=np.uint32)  # (the ids' type: gathered once, no copy)
    rank[np.argsort(first, kind="stable")] = np.arange(n_groups)
    return rank[group]
