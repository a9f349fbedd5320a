"""Dynamic batch size: the seed's rule, done properly (a window of outcomes, not a running guess).

Shrink (down to 2 rows) when the recent error rate is high; grow when calls go well: up to
``max_items`` (the seed's 6) when calls are faster than ``target_latency_s``, or up to
``token_limit`` (row count capped by ``rate_bound_items``) while the request rate is the binding
limit, since fewer, larger requests then finish sooner. The pool applies the target to batches
not yet started by merging or splitting pending work; every row still runs in exactly one batch.

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
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field


MOVES_KEPT = 64  # target changes remembered (to tell the size of a call answered now)


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
    queued_rows: float = math.inf  # rows not yet taken (the scheduler's count, at each take)
    _outcomes: deque[tuple[bool, float]] = field(init=False)
    _times: deque[float] = field(init=False)  # when the window's outcomes came
    _sizes: deque[int] = field(init=False)  # ... and the rows their calls likely had
    _moves: deque[tuple[float, int]] = field(init=False)  # (when, target) of the last moves
    _since_change: int = 0
    _errors: int = 0  # failures in the window (running sums: observe is on the hot path)
    _latency: float = 0.0

    def __post_init__(self) -> None:
        self.target = self.initial
        self._outcomes = deque(maxlen=self.window)
        self._times = deque(maxlen=self.window)
        self._sizes = deque(maxlen=self.window)
        self._moves = deque([(-math.inf, self.initial)], maxlen=MOVES_KEPT)

    def observe(self, *, ok: bool, latency_s: float) -> None:
        """Record one finished call and maybe move the target by one step."""
        window = self._outcomes
        if len(window) == window.maxlen:
            old_ok, old_latency = window[0]
            self._errors -= not old_ok
            self._latency -= old_latency
        window.append((ok, latency_s))
        now = _now()
        self._times.append(now)
        self._sizes.append(self._target_at(now - latency_s))
        self._errors += not ok
        self._latency += latency_s
        self._since_change += 1
        if self._since_change < self.window // 2 or len(window) < self.window // 2:
            return
        errors = self._errors / len(window)
        mean = self._latency / len(window)
        if errors > self.high_error_rate:
            self._move(max(min(self.minimum, self.initial), self.target - 1))
        elif errors <= self.low_error_rate and self.rate_bound:
            best = self._rate_best(mean)
            if best > self.target:  # the rate binds: grow fast, up to the best size
                self._move(min(best, self.target + max(1, self.target // 2)))
            elif best < self.target:  # the queue drains: the last calls short
                self._move(max(best, self.target // 2))
        elif errors <= self.low_error_rate and self._may_grow(mean):
            self._move(min(self.max_items, self.target + 1))

    def _rate_best(self, mean_latency: float) -> int:
        """The size that finishes the queued rows soonest while the request rate binds.

        ``Q`` rows left, ``r`` requests a second (the window's answers came at that rate),
        a call of ``b`` rows takes about ``c * b`` (``c``: the window's mean latency over
        the target): sending the rest takes ``Q / (b * r)``, and its last call ``c * b``
        more. Their sum is least at ``b = sqrt(Q / (r * c))``, where the queue takes as long
        to send as a call takes: bigger batches would only lengthen the last calls, smaller
        ones spend requests. Never under ``initial`` (the planned size), never over
        ``rate_bound_items``; unknown ``Q`` or rate: grow up to the cap."""
        times = self._times
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        if math.isinf(self.queued_rows) or span <= 0 or mean_latency <= 0:
            return self.rate_bound_items
        rate = (len(times) - 1) / span
        per_row = mean_latency * len(self._sizes) / sum(self._sizes)
        best = math.sqrt(self.queued_rows / (rate * per_row))
        return max(self.initial, min(self.rate_bound_items, round(best)))

    def _target_at(self, t: float) -> int:
        """The target at time ``t``: the size of a call sent then (what a batch taken then
        was resized to)."""
        moves = self._moves
        i = bisect_right(moves, t, key=lambda m: m[0])
        return moves[max(0, i - 1)][1]

    def _may_grow(self, mean_latency: float) -> bool:
        if self.rate_bound:
            return self.target < self.rate_bound_items
        fast = self.target_latency_s is not None and mean_latency < self.target_latency_s
        return fast and self.target < self.max_items

    def _move(self, target: int) -> None:
        if target != self.target:
            self.target = target
            self._since_change = 0
            self._moves.append((_now(), target))


def _now() -> float:
    """The running loop's clock (a virtual one in simulations), else the monotonic clock."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
