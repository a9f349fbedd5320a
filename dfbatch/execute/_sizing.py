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

from collections import deque
from dataclasses import dataclass, field


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
    _outcomes: deque[tuple[bool, float]] = field(init=False)
    _since_change: int = 0
    _errors: int = 0  # failures in the window (running sums: observe is on the hot path)
    _latency: float = 0.0

    def __post_init__(self) -> None:
        self.target = self.initial
        self._outcomes = deque(maxlen=self.window)

    def observe(self, *, ok: bool, latency_s: float) -> None:
        """Record one finished call and maybe move the target by one step."""
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
        elif errors <= self.low_error_rate and self._may_grow(mean):
            step = max(1, self.target // 2) if self.rate_bound else 1  # the rate binds: grow fast
            cap = self.rate_bound_items if self.rate_bound else self.max_items
            self._move(min(cap, self.target + step))

    def _may_grow(self, mean_latency: float) -> bool:
        if self.rate_bound:
            return self.target < self.rate_bound_items
        fast = self.target_latency_s is not None and mean_latency < self.target_latency_s
        return fast and self.target < self.max_items

    def _move(self, target: int) -> None:
        if target != self.target:
            self.target = target
            self._since_change = 0
