"""Rate limits of the simulated endpoint, and the headers a provider or gateway sends about them.

Two ways to enforce a per-minute limit (``SimConfig.limit_mode``):

- ``"bucket"``: a token bucket per limit, refilled continuously at ``limit / minute`` and
  holding ``limit x hold / minute`` (``hold`` = ``limit_window_s``; a minute by default, one
  second for a provider that enforces per second). It starts full.
- ``"calendar"``: a fixed window of ``hold`` seconds aligned on the clock; each window admits
  ``limit x hold / minute`` and the count resets at the boundary (a gateway's calendar minute).

A request is admitted only when *every* limit can pay for it; otherwise it is rejected with the
wait after which it would be admitted (``inf`` when it alone exceeds a limit's capacity).

Header styles (``SimConfig.headers``): ``"openai"`` sends ``x-ratelimit-limit-*`` (the refill
per *real* minute, so a client that learns its pacing from them is right under ``time_scale``),
``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` (durations such as ``6m0s``), and a 429
with ``retry-after`` (and ``retry-after-ms``); ``"none"`` sends nothing; ``"litellm"`` sends the
proxy's per-key ``x-ratelimit-api_key-{limit,remaining}-*`` and a 429 whose only hint is
``llm_provider-retry-after`` (the window's length, not the true wait); ``"ietf"`` sends the
IETF draft's ``RateLimit-Policy`` / ``RateLimit`` fields for requests and a 429 with
``retry-after`` only.

Examples
--------
>>> from dfbatch.sim.ratelimit import RateLimiter
>>> lim = RateLimiter(rpm=2, tpm=1000, window_s=60.0)
>>> lim.admit(tokens=100, now=0.0).ok, lim.admit(tokens=100, now=0.0).ok
(True, True)
>>> d = lim.admit(tokens=100, now=0.0)
>>> d.ok, d.retry_after_s, d.headers["x-ratelimit-remaining-requests"]
(False, 30.0, '0')
>>> per_second = RateLimiter(rpm=120, tpm=None, window_s=60.0, hold_s=1.0)
>>> [per_second.admit(0, now=0.0).ok for _ in range(3)]  # holds 2 requests, not 120
[True, True, False]
>>> gateway = RateLimiter(rpm=2, tpm=None, window_s=60.0, mode="calendar", offset_s=50.0)
>>> [gateway.admit(0, now=0.0).ok for _ in range(3)], gateway.admit(0, now=0.0).retry_after_s
([True, True, False], 10.0)
>>> gateway.admit(0, now=10.0).ok  # a new minute: the count starts again
True
>>> format_duration(0.0123), format_duration(1.5), format_duration(360.0)
('13ms', '1.5s', '6m0s')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "Decision",
    "FixedWindow",
    "RateLimiter",
    "TokenBucket",
    "format_duration",
    "rejection_headers",
]

Mode = Literal["bucket", "calendar"]
Style = Literal["openai", "none", "litellm", "ietf"]


class Limit(Protocol):
    capacity: float
    level: float

    def refill(self, now: float) -> None: ...
    def wait_for(self, amount: float) -> float: ...
    def reset_s(self) -> float: ...


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


class FixedWindow:
    """``capacity`` units per window of ``window_s``; windows start at ``k x window_s -
    offset_s`` on the ``now`` axis (``offset_s``: where the clock stands in its window at 0)."""

    def __init__(self, capacity: float, window_s: float, offset_s: float = 0.0) -> None:
        self.capacity = float(capacity)
        self.window_s = window_s
        self.offset_s = offset_s
        self.level = self.capacity
        self._index: int | None = None
        self._now = 0.0

    def refill(self, now: float) -> None:
        self._now = max(self._now, now)
        index = math.floor((self._now + self.offset_s) / self.window_s)
        if index != self._index:
            self._index, self.level = index, self.capacity

    def wait_for(self, amount: float) -> float:
        if amount > self.capacity:
            return math.inf
        return 0.0 if amount <= self.level else self.reset_s()

    def reset_s(self) -> float:
        """Seconds until the next window boundary."""
        position = (self._now + self.offset_s) % self.window_s
        return self.window_s - position


@dataclass(frozen=True)
class Decision:
    ok: bool
    retry_after_s: float = 0.0  # inf: the request alone exceeds a limit
    limited_by: str = ""  # "requests" or "tokens" when rejected
    headers: dict[str, str] = field(default_factory=dict)


class RateLimiter:
    """RPM and TPM limits (either may be ``None`` = unlimited).

    Parameters
    ----------
    rpm, tpm
        Requests / tokens per (simulated) minute.
    window_s
        Real seconds in one simulated minute (``60 x time_scale``).
    hold_s
        Real seconds of budget a limit holds (bucket) or the fixed window's length
        (calendar); default ``window_s`` (a full minute).
    mode
        ``"bucket"`` or ``"calendar"`` (see the module docstring).
    offset_s
        Calendar mode: real seconds the clock has already spent in its window at ``now=0``.
    style
        Header style of answers: ``"openai"``, ``"none"``, ``"litellm"`` or ``"ietf"``.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        window_s: float,
        *,
        hold_s: float | None = None,
        mode: Mode = "bucket",
        offset_s: float = 0.0,
        style: Style = "openai",
    ) -> None:
        hold = window_s if hold_s is None else hold_s
        self.style = style
        self.hold_s = hold
        self.per_real_minute: dict[str, float] = {}
        self.limits: dict[str, Limit] = {}
        for name, per_minute in (("requests", rpm), ("tokens", tpm)):
            if per_minute is None:
                continue
            capacity = per_minute * hold / window_s
            self.per_real_minute[name] = per_minute * 60.0 / window_s
            if mode == "calendar":
                self.limits[name] = FixedWindow(capacity, hold, offset_s)
            else:
                self.limits[name] = TokenBucket(capacity, hold)

    @property
    def buckets(self) -> dict[str, Limit]:
        """The limits by name (``"requests"``, ``"tokens"``); kept for older callers."""
        return self.limits

    def admit(self, tokens: float, now: float) -> Decision:
        """Charge one request of ``tokens`` if every limit can pay, else say how long to wait."""
        cost = {"requests": 1.0, "tokens": float(tokens)}
        waits = {}
        for name, limit in self.limits.items():
            limit.refill(now)
            waits[name] = limit.wait_for(cost[name])
        blocking = {k: w for k, w in waits.items() if w > 0}
        if not blocking:
            for name, limit in self.limits.items():
                limit.level -= cost[name]
            return Decision(True, headers=self.headers())
        name = max(blocking, key=lambda k: blocking[k])
        return Decision(False, blocking[name], name, self.headers())

    def headers(self) -> dict[str, str]:
        """Rate-limit headers of an answer, in this limiter's style."""
        if self.style == "none":
            return {}
        if self.style == "ietf":  # (the draft counts requests; it has no token unit)
            limit = self.limits.get("requests")
            if limit is None:
                return {}
            return {"RateLimit-Policy": f'"requests";q={_decimal(limit.capacity)};'
                                        f"w={_decimal(self.hold_s)}",
                    "RateLimit": f'"requests";r={max(0, int(limit.level))};'
                                 f"t={_decimal(limit.reset_s())}"}
        infix = "api_key-" if self.style == "litellm" else ""
        out: dict[str, str] = {}
        for name, limit in self.limits.items():
            out[f"x-ratelimit-{infix}limit-{name}"] = str(round(self.per_real_minute[name]))
            out[f"x-ratelimit-{infix}remaining-{name}"] = str(max(0, int(limit.level)))
            if self.style == "openai":
                out[f"x-ratelimit-reset-{name}"] = format_duration(limit.reset_s())
        return out


def rejection_headers(
    style: Style, wait_s: float, *, window_s: float, retry_after_ms: bool = True
) -> dict[str, str]:
    """The retry hints a 429 carries (besides the answer headers), in ``style``.

    ``wait_s`` is the true wait (real seconds; ``inf`` = waiting cannot help: no hint);
    ``window_s`` the enforcement window's length in real seconds (LiteLLM's fixed hint).

    >>> rejection_headers("openai", 0.25, window_s=60.0)
    {'retry-after': '1', 'retry-after-ms': '250'}
    >>> rejection_headers("litellm", 0.25, window_s=60.0), rejection_headers("none", 3, window_s=1)
    ({'llm_provider-retry-after': '60'}, {})
    """
    if math.isinf(wait_s) or style == "none":
        return {}
    if style == "ietf":
        return {"retry-after": str(max(1, math.ceil(wait_s)))}
    if style == "litellm":
        return {"llm_provider-retry-after": str(max(1, math.ceil(window_s)))}
    out = {"retry-after": str(max(1, math.ceil(wait_s)))}
    if retry_after_ms:
        out["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
    return out


def _decimal(value: float) -> str:
    """A draft field's number: whole where it is (``60``), else up to 3 decimals (``0.6``:
    a window under ``time_scale``)."""
    return str(round(value)) if value == round(value) else f"{value:.3f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it (Go style)."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text
