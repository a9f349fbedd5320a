"""What the simulated endpoint served: counts by status, peak concurrency, tokens per window.

Tests and benchmarks read these to check that a client respected the limits (few or no 429s,
at most N requests in flight, at most ``tpm`` tokens admitted in any window).

Examples
--------
>>> from dfbatch.sim.stats import SimStats
>>> s = SimStats()
>>> for t, status in [(0.0, 200), (0.5, 429), (1.0, 200), (61.0, 200)]:
...     s.record("chat", status, charged_tokens=100, t=t)
>>> snap = s.snapshot()
>>> snap.requests, snap.rate_limited, snap.by_status[200]
(4, 1, 3)
>>> s.max_in_window(60.0), s.max_in_window(60.0, what="tokens")
(2.0, 200.0)
>>> s.max_in_window(60.0, admitted=False)
3.0
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl


@dataclass(frozen=True)
class SimSnapshot:
    """Frozen counts of everything the endpoint saw so far."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_endpoint: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    server_errors: int = 0
    bad_requests: int = 0
    hangs: int = 0
    resets: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SimStats:
    """Thread-safe recorder; the server calls ``enter`` / ``leave`` / ``record``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._log: list[tuple[float, str, int, int, int, int, float | None]] = []
        self._faults: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0

    def now(self) -> float:
        """Seconds since the stats were created (the time axis of ``frame``)."""
        return time.monotonic() - self._t0

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def fault(self, kind: str) -> None:
        """Count an injected fault that has no HTTP status (``"hang"``, ``"reset"``)."""
        with self._lock:
            self._faults[kind] += 1

    def record(
        self,
        endpoint: str,
        status: int,
        *,
        charged_tokens: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        retry_after_s: float | None = None,
        t: float | None = None,
    ) -> None:
        """Log one answered (or reset: status 0) request that arrived at ``t``."""
        row = (
            self.now() if t is None else t,
            endpoint,
            status,
            charged_tokens,
            prompt_tokens,
            completion_tokens,
            retry_after_s,
        )
        with self._lock:
            self._log.append(row)

    def snapshot(self) -> SimSnapshot:
        with self._lock:
            log = list(self._log)
            faults = Counter(self._faults)
            in_flight, peak = self._in_flight, self._max_in_flight
        status = Counter(r[2] for r in log)
        return SimSnapshot(
            requests=len(log),
            by_status=dict(status),
            by_endpoint=dict(Counter(r[1] for r in log)),
            rate_limited=status[429],
            server_errors=sum(n for s, n in status.items() if s >= 500),
            bad_requests=sum(n for s, n in status.items() if 400 <= s < 500 and s != 429),
            hangs=faults["hang"],
            resets=faults["reset"],
            in_flight=in_flight,
            max_in_flight=peak,
            prompt_tokens=sum(r[4] for r in log),
            completion_tokens=sum(r[5] for r in log),
        )

    def frame(self) -> pl.DataFrame:
        """One row per request: ``t`` (arrival, s), endpoint, status, charged / prompt /
        completion tokens, and the ``retry_after_s`` a 429 told the client to wait."""
        with self._lock:
            rows = list(self._log)
        names = [
            "t",
            "endpoint",
            "status",
            "charged_tokens",
            "prompt_tokens",
            "completion_tokens",
            "retry_after_s",
        ]
        dtypes = [pl.Float64, pl.String, *[pl.Int64] * 4, pl.Float64]
        schema = dict(zip(names, dtypes, strict=True))
        return pl.DataFrame(rows, schema=schema, orient="row")

    def max_in_window(
        self,
        window_s: float,
        *,
        what: Literal["requests", "tokens"] = "requests",
        admitted: bool = True,
    ) -> float:
        """Most requests (or charged tokens) arriving within any ``window_s`` seconds.

        ``admitted=True`` counts only requests the rate limiter let through (not 429s).
        """
        with self._lock:
            rows = [r for r in self._log if not admitted or r[2] != 429]
        if not rows:
            return 0.0
        rows.sort()
        t = np.array([r[0] for r in rows])
        w = np.array([1.0 if what == "requests" else r[3] for r in rows])
        cum = np.concatenate([[0.0], np.cumsum(w)])
        end = np.searchsorted(t, t + window_s, side="left")  # window [t_i, t_i + window)
        return float(np.max(cum[end] - cum[np.arange(len(t))]))
