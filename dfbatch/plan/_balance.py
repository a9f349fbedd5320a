"""Balancing: assign weighted batches to agents so the heaviest agent's load is near-minimal.

Algorithm. Batches are sorted heaviest first. Exact LPT (heaviest batch to the lightest agent)
over the heavy head, then greedy rounds of ``n_agents`` batches (agents re-sorted each round),
then a snake deal of the remaining light batches with agents in order of load. A final refine
step swaps batches between the heaviest and the lightest agent while that helps. Deterministic.
``balance_ratio`` reports the heaviest agent's load over the lower bound
``max(total / n_agents, heaviest batch)``.

Examples
--------
>>> from dfbatch.plan._balance import balance, balance_ratio
>>> w = [10, 9, 8, 7, 6, 5, 4, 3]
>>> agents = balance(w, 2)
>>> agents.tolist(), round(balance_ratio(w, agents, 2), 3)
([0, 1, 1, 0, 0, 1, 1, 0], 1.0)
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from dfbatch.errors import ConfigError

_HEAD_EPS = 0.002  # exact LPT for batches heavier than this fraction of an agent's mean load
_HEAD_MAX = 4096  # ... but for at most this many batches
_ROUNDS_MAX = 512  # then greedy rounds of n_agents batches, then a snake deal of the rest
_REFINE_MAX = 4096  # swap steps between the heaviest and the lightest agent
_REFINE_WORK = 20_000_000  # ... and at most this many batch visits in all
_REFINE_TOL = 1e-5  # ... until the heaviest agent is this close to the lower bound


def balance(weights: Any, n_agents: int) -> np.ndarray:
    """Assign batches to ``n_agents`` agents so that the heaviest agent's load is near-minimal.

    Exact LPT (heaviest batch to the lightest agent) over the heavy head, then greedy rounds of
    ``n_agents`` batches (heaviest to lightest, agents re-sorted each round), then a snake deal of
    the remaining light batches with agents in order of load. Deterministic.

    Examples
    --------
    >>> from dfbatch.plan import balance, balance_ratio
    >>> w = [10, 9, 8, 7, 6, 5, 4, 3]
    >>> agents = balance(w, 2)
    >>> agents.tolist(), round(balance_ratio(w, agents, 2), 3)
    ([0, 1, 1, 0, 0, 1, 1, 0], 1.0)
    """
    if isinstance(n_agents, bool) or not isinstance(n_agents, int | np.integer) or n_agents < 1:
        msg = f"n_agents must be an integer >= 1, got {n_agents!r}"
        raise ConfigError(msg)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (len(w) and (w.min() < 0 or not np.isfinite(w).all())):
        msg = "weights must be a 1-d array of finite non-negative numbers"
        raise ConfigError(msg)
    out = np.zeros(len(w), dtype=np.uint16 if n_agents <= 65_536 else np.uint32)
    order = np.argsort(-w, kind="stable")  # heaviest first, ties by batch id
    ws = w[order]
    loads = np.zeros(n_agents, dtype=np.float64)
    threshold = _HEAD_EPS * ws.sum() / n_agents
    head = min(int(np.searchsorted(-ws, -threshold, side="left")), _HEAD_MAX)
    out[order[:head]] = _lpt(ws[:head], loads)
    mid = min(len(w) - head, _ROUNDS_MAX * n_agents)
    out[order[head : head + mid]] = _rounds(ws[head : head + mid], loads)
    out[order[head + mid :]] = _snake(len(w) - head - mid, loads)
    _refine(w, out, n_agents)
    return out


def _lpt(ws: np.ndarray, loads: np.ndarray) -> np.ndarray:
    heap = [(float(load), a) for a, load in enumerate(loads)]
    heapq.heapify(heap)
    out = np.empty(len(ws), dtype=np.int64)
    for i, w in enumerate(ws.tolist()):
        load, a = heap[0]
        heapq.heapreplace(heap, (load + w, a))
        out[i] = a
    for load, a in heap:
        loads[a] = load
    return out


def _rounds(ws: np.ndarray, loads: np.ndarray) -> np.ndarray:
    n_agents = len(loads)
    out = np.empty(len(ws), dtype=np.int64)
    for start in range(0, len(ws), n_agents):
        chunk = ws[start : start + n_agents]
        lightest = np.argsort(loads, kind="stable")[: len(chunk)]
        loads[lightest] += chunk
        out[start : start + len(chunk)] = lightest
    return out


def _snake(n: int, loads: np.ndarray) -> np.ndarray:
    n_agents = len(loads)
    i = np.arange(n)
    col = np.where((i // n_agents) % 2 == 0, i % n_agents, n_agents - 1 - i % n_agents)
    return np.argsort(loads, kind="stable")[col]


def _refine(w: np.ndarray, agent: np.ndarray, n_agents: int) -> None:
    """Swap (or move) batches between the heaviest and the lightest agent while that helps.

    Each step picks, with one ``searchsorted``, the pair whose weight difference is closest to
    half the load gap. Steps are capped so that the total work stays O(batches) x a constant.
    """
    if len(w) == 0 or n_agents < 2:
        return
    loads = np.bincount(agent, weights=w, minlength=n_agents)
    good_enough = max(w.sum() / n_agents, w.max()) * (1 + _REFINE_TOL)
    for _ in range(min(_REFINE_MAX, 4 * n_agents + 64, _REFINE_WORK // len(w) + 1)):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        if loads[hi] <= good_enough:
            return
        x = np.flatnonzero(agent == hi)
        y = np.append(np.flatnonzero(agent == lo), -1)  # -1: move, swap with nothing
        wy = np.append(w[y[:-1]], 0.0)
        by_w = np.argsort(wy, kind="stable")
        pos = np.searchsorted(wy[by_w], w[x] - gap / 2)
        cand = by_w[np.clip(np.stack([pos - 1, pos]), 0, len(wy) - 1)]  # 2 x len(x)
        delta = w[x][None, :] - wy[cand]
        score = np.where((delta > 0) & (delta < gap), np.abs(delta - gap / 2), np.inf)
        best = int(np.argmin(score))
        if not np.isfinite(score.flat[best]):
            return
        i, j = divmod(best, len(x))
        agent[x[j]] = lo
        if y[cand[i, j]] >= 0:
            agent[y[cand[i, j]]] = hi
        loads[hi] -= delta[i, j]
        loads[lo] += delta[i, j]


def balance_ratio(weights: Any, agents: Any, n_agents: int) -> float:
    """Heaviest agent load / the lower bound ``max(total / n_agents, heaviest batch)``.

    Examples
    --------
    >>> from dfbatch.plan import balance_ratio
    >>> balance_ratio([4, 4, 2], [0, 1, 1], 2)
    1.2
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        return 1.0
    loads = np.bincount(np.asarray(agents, dtype=np.int64), weights=w, minlength=n_agents)
    bound = max(w.sum() / n_agents, w.max())
    return float(loads.max() / bound) if bound > 0 else 1.0
