"""Request and token buckets of the simulated endpoint, and OpenAI-style rate-limit headers.

Each limit is a token bucket holding one simulated minute of budget, refilled continuously and
starting full. A request is admitted only when *every* bucket can pay for it; otherwise it is
rejected with the wait after which it would be admitted (``retry-after``).

``x-ratelimit-limit-*`` headers give the refill rate per *real* minute, so a client that learns
its pacing from them is right even under ``time_scale`` (they equal the configured limits at
``time_scale=1``); ``x-ratelimit-remaining-*`` is what the bucket holds now.

Examples
--------
>>> from dfbatch.sim.ratelimit import RateLimiter
>>> lim = RateLimiter(rpm=2, tpm=1000, window_s=60.0)
>>> lim.admit(tokens=100, now=0.0).ok, lim.admit(tokens=100, now=0.0).ok
(True, True)
>>> d = lim.admit(tokens=100, now=0.0)
>>> d.ok, d.retry_after_s, d.headers["x-ratelimit-remaining-requests"]
(False, 30.0, '0')
>>> format_duration(0.0123), format_duration(1.5), format_duration(360.0)
('13ms', '1.5s', '6m0s')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Decision", "RateLimiter", "TokenBucket", "format_duration"]


class TokenBucket:
    """``capacity`` units, refilled at ``capacity / window_s`` per second, starting full."""

    def __init__(self, capacity: float, window_s: float) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / window_s
        self.level = self.capacity
        self._t: float | None = None

    def refill(self, now: float) -> None:
        if self._t is not None and now > self._t:
            self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now if self._t is None else max(self._t, now)

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (``inf`` when it exceeds the capacity)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


@dataclass(frozen=True)
class Decision:
    ok: bool
    retry_after_s: float = 0.0  # inf: the request alone exceeds a limit
    limited_by: str = ""  # "requests" or "tokens" when rejected
    headers: dict[str, str] = field(default_factory=dict)


class RateLimiter:
    """RPM and TPM buckets (either may be ``None`` = unlimited) over a window of ``window_s``."""

    def __init__(self, rpm: float | None, tpm: float | None, window_s: float) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        if rpm is not None:
            self.buckets["requests"] = TokenBucket(rpm, window_s)
        if tpm is not None:
            self.buckets["tokens"] = TokenBucket(tpm, window_s)

    def admit(self, tokens: float, now: float) -> Decision:
        """Charge one request of ``tokens`` if every bucket can pay, else say how long to wait."""
        cost = {"requests": 1.0, "tokens": float(tokens)}
        waits = {}
        for name, bucket in self.buckets.items():
            bucket.refill(now)
            waits[name] = bucket.wait_for(cost[name])
        blocking = {k: w for k, w in waits.items() if w > 0}
        if not blocking:
            for name, bucket in self.buckets.items():
                bucket.level -= cost[name]
            return Decision(True, headers=self.headers())
        name = max(blocking, key=lambda k: blocking[k])
        return Decision(False, blocking[name], name, self.headers())

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, bucket in self.buckets.items():
            out[f"x-ratelimit-limit-{name}"] = str(round(bucket.rate * 60))  # per real minute
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_s())
        return out


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (Go style)."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text
