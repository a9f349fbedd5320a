"""Dynamic batch size: the seed's rule, done properly (a window of outcomes, not a running guess).

Shrink (down to 2 rows) when the recent error rate is high; grow when calls go well: up to
``max_items`` (the seed's 6) when calls are faster than ``target_latency_s``, or, while the
request rate is the binding limit (fewer, larger requests then finish sooner), towards the size
that finishes the rows still queued soonest (``BatchSizer.rate_best``), within ``token_limit``
and ``rate_bound_items``: bigger batches save requests but their calls take longer, and the
run's last calls set its makespan, so the target shrinks again as the queue drains. The pool
applies the target to batches not yet started by merging or splitting pending work; every row
still runs in exactly one batch.

Examples
--------
>>> s = BatchSizer(initial=4)
>>> for _ in range(20):
...     s.observe(ok=False, latency_s=1.0)
>>> s.target
2
>>> s = BatchSizer(initial=4, target_latency_s=2.0)
>>> for _ in range(40):
...     s.observe(ok=True, latency_s=0.5)
>>> s.target
6

The request rate binds: answers come 2 a second, calls of 4 rows take 2 s (0.5 s per row). 800
rows queued finish soonest in calls of ``sqrt(800 / (2 * 0.5))`` = 28 rows (14 s to send them,
14 s for the last call); the target grows towards it by half a step at a time:

>>> clock = [0.0]
>>> s = BatchSizer(initial=4, clock=lambda: clock[0], rate_bound=True, queued_rows=800)
>>> for _ in range(16):
...     clock[0] += 0.5
...     s.observe(ok=True, latency_s=2.0)
>>> s.rate_best(), s.target
(28, 9)
>>> s.queued_rows = 100  # the queue drains: shorter last calls
>>> s.rate_best()
10
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MOVES_KEPT = 64  # target changes remembered (to tell the rows of a call answered now)


def _now() -> float:
    """The running loop's clock (a virtual one in simulations), else the monotonic clock."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


@dataclass
class BatchSizer:
    initial: int
    minimum: int = 2
    max_items: int = 6
    rate_bound_items: int = 64
    target_latency_s: float | None = None
    window: int = 16
    high_error_rate: float = 0.1
    low_error_rate: float = 0.02
    target: int = field(init=False)
    rate_bound: bool = False
    queued_rows: float = math.inf  # rows not yet sent (the scheduler's estimate, at each take)
    clock: Callable[[], float] = field(default=_now, repr=False)
    _outcomes: deque[tuple[bool, float]] = field(init=False)
    # while the rate binds: (when, latency, rows) of the window's answered calls, rows being
    # the target when the call was sent (what a batch taken then was resized to)
    _paced: deque[tuple[float, float, int]] = field(init=False)
    _moves: deque[tuple[float, int]] = field(init=False)  # (when, target) of the last moves
    _since_change: int = 0
    _errors: int = 0  # failures in the window (running sums: observe is on the hot path)
    _latency: float = 0.0

    def __post_init__(self) -> None:
        self.target = self.initial
        self._outcomes = deque(maxlen=self.window)
        self._paced = deque(maxlen=self.window)
        self._moves = deque([(-math.inf, self.initial)], maxlen=MOVES_KEPT)

    def observe(self, *, ok: bool, latency_s: float) -> None:
        """Record one finished call and maybe move the target by one step."""
        if self.rate_bound:
            if ok:
                now = self.clock()
                self._paced.append((now, latency_s, self._target_at(now - latency_s)))
        elif self._paced:  # the rate stopped binding: its answers say nothing of the next spell
            self._paced.clear()
        window = self._outcomes
        if len(window) == self.window:  # (the oldest outcome leaves the window)
            old_ok, old_latency = window[0]
            if not old_ok:
                self._errors -= 1
            self._latency -= old_latency
        window.append((ok, latency_s))
        if not ok:
            self._errors += 1
        self._latency += latency_s
        since = self._since_change = self._since_change + 1
        half = self.window // 2
        if since < half or len(window) < half:
            return
        if not self._errors and not self.rate_bound and self.target_latency_s is None:
            return  # (the common case: no error to shrink for, no reason to grow)
        errors = self._errors / len(window)
        mean = self._latency / len(window)
        if errors > self.high_error_rate:
            self._move(max(min(self.minimum, self.initial), self.target - 1))
        elif errors <= self.low_error_rate and self.rate_bound:
            best = self.rate_best()
            if best > self.target:  # the rate binds: grow fast (by half), up to the best size
                self._move(min(best, self.target + max(1, self.target // 2)))
            elif best < self.target:  # the queue drains: shorter last calls
                self._move(max(best, self.target // 2))
        elif errors <= self.low_error_rate and self._may_grow(mean):
            self._move(min(self.max_items, self.target + 1))

    def rate_best(self) -> int:
        """The batch size that finishes the queued rows soonest while the request rate binds.

        ``Q`` rows queued, ``r`` requests a second (the rate the window's answers came at),
        ``c`` seconds per row (the slowest of the window's answers, latency over rows: the run
        ends with the slowest of its last calls, not with an average one): sending the rest in
        calls of ``b`` rows takes ``Q / (b * r)``, and the last call about ``c * b`` more. The
        sum is least at ``b = sqrt(Q / (r * c))``, where the queue takes as long to send as a
        call takes: bigger batches would only lengthen the last calls, smaller ones spend
        requests. Never under ``initial`` (the planned size) nor over ``rate_bound_items``;
        ``Q`` unknown or too few answers yet: ``rate_bound_items``."""
        paced = self._paced
        if math.isinf(self.queued_rows) or len(paced) < 4:
            return self.rate_bound_items
        span = paced[-1][0] - paced[0][0]
        per_row = max(latency / rows for _, latency, rows in paced)
        if span <= 0 or per_row <= 0:
            return self.rate_bound_items
        rate = (len(paced) - 1) / span
        best = math.sqrt(max(0.0, self.queued_rows) / (rate * per_row))
        return max(self.initial, min(self.rate_bound_items, round(best)))

    def _target_at(self, t: float) -> int:
        """The target at time ``t``."""
        moves = self._moves
        return moves[max(0, bisect_right(moves, t, key=_when) - 1)][1]

    def _may_grow(self, mean_latency: float) -> bool:
        fast = self.target_latency_s is not None and mean_latency < self.target_latency_s
        return fast and self.target < self.max_items

    def _move(self, target: int) -> None:
        if target != self.target:
            self.target = target
            self._since_change = 0
            self._moves.append((self.clock(), target))


def _when(move: tuple[float, int]) -> float:
    return move[0]
