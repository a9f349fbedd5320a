"""What the simulated endpoint served: counts by status, peak concurrency, tokens per window.

Tests and benchmarks read these to check that a client respected the limits (few or no 429s,
at most N requests in flight, at most ``tpm`` tokens admitted in any window, at most one
request a second reaching a dead server). The request log holds, per request, its arrival
(real seconds since the server started, and simulated seconds: real / ``time_scale``), the
status (0: connection reset), what kind of answer it got (``"ok"``, ``"rate_limit"``,
``"overload"``, ``"outage"``, ``"auth"``, ...) and whether the server was down.

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
>>> max_in_sliding_window([0.0, 0.4, 0.9, 1.0, 5.0], 1.0)  # [t, t + 1) holds 3 at most
3
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import polars as pl

__all__ = ["Entry", "SimSnapshot", "SimStats", "max_in_sliding_window"]


class Entry(NamedTuple):
    """One request in the log (``t``: real seconds since the server started)."""

    t: float
    endpoint: str
    status: int  # 0: the connection was reset
    charged_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_after_s: float | None = None
    kind: str = "ok"
    down: bool = False


def max_in_sliding_window(
    times: Sequence[float] | np.ndarray,
    window_s: float,
    weights: Sequence[float] | np.ndarray | None = None,
) -> float:
    """Most arrivals (or most total ``weights``) in any half-open window ``[t, t + window_s)``.

    ``times`` need not be sorted. Returns an ``int`` when ``weights`` is None.
    """
    t = np.asarray(times, dtype=float)
    if t.size == 0:
        return 0
    order = np.argsort(t, kind="stable")
    t = t[order]
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=float)[order]
    cum = np.concatenate([[0.0], np.cumsum(w)])
    end = np.searchsorted(t, t + window_s, side="left")
    best = float(np.max(cum[end] - cum[np.arange(t.size)]))
    return round(best) if weights is None else best


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
    overloaded: int = 0  # 429s that were not rate limits (rate_limited excludes them)
    down_requests: int = 0  # requests that arrived while the server was down (outage)
    by_kind: dict[str, int] = field(default_factory=dict)


class SimStats:
    """Thread-safe recorder; the server calls ``start`` / ``enter`` / ``leave`` / ``record``.

    ``time_scale``: real seconds per simulated second, for the ``simulated`` views.
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        self._lock = threading.Lock()
        self.time_scale = time_scale
        self._t0 = time.monotonic()
        self._log: list[Entry] = []
        self._faults: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0

    def now(self) -> float:
        """Real seconds since the server started (the time axis of ``frame``)."""
        return time.monotonic() - self._t0

    def sim_now(self) -> float:
        """Simulated seconds since the server started (``now() / time_scale``)."""
        return self.now() / self.time_scale

    def start(self) -> None:
        """Restart the clock at server start (only while nothing is logged yet)."""
        with self._lock:
            if not self._log:
                self._t0 = time.monotonic()

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
        kind: str | None = None,
        down: bool = False,
    ) -> None:
        """Log one answered (or reset: status 0) request that arrived at ``t`` (real s).

        ``kind`` defaults to ``"ok"`` for status < 400 and ``"rate_limit"`` for a 429.
        """
        if kind is None:
            kind = "ok" if 0 < status < 400 else "rate_limit" if status == 429 else "error"
        row = Entry(
            self.now() if t is None else t,
            endpoint,
            status,
            charged_tokens,
            prompt_tokens,
            completion_tokens,
            retry_after_s,
            kind,
            down,
        )
        with self._lock:
            self._log.append(row)

    def snapshot(self) -> SimSnapshot:
        with self._lock:
            log = list(self._log)
            faults = Counter(self._faults)
            in_flight, peak = self._in_flight, self._max_in_flight
        status = Counter(r.status for r in log)
        kinds = Counter(r.kind for r in log)
        return SimSnapshot(
            requests=len(log),
            by_status=dict(status),
            by_endpoint=dict(Counter(r.endpoint for r in log)),
            rate_limited=sum(1 for r in log if r.status == 429 and r.kind != "overload"),
            server_errors=sum(n for s, n in status.items() if s >= 500),
            bad_requests=sum(n for s, n in status.items() if 400 <= s < 500 and s != 429),
            hangs=faults["hang"],
            resets=faults["reset"],
            in_flight=in_flight,
            max_in_flight=peak,
            prompt_tokens=sum(r.prompt_tokens for r in log),
            completion_tokens=sum(r.completion_tokens for r in log),
            overloaded=kinds["overload"],
            down_requests=sum(1 for r in log if r.down),
            by_kind=dict(kinds),
        )

    def entries(self) -> list[Entry]:
        """A copy of the request log, in arrival order of recording."""
        with self._lock:
            return list(self._log)

    def frame(self) -> pl.DataFrame:
        """One row per request: ``t`` (arrival, real s), ``sim_t`` (simulated s), endpoint,
        status, charged / prompt / completion tokens, the ``retry_after_s`` a 429 told the
        client to wait, ``kind`` of answer and ``down`` (arrived during an outage)."""
        rows = self.entries()
        names = list(Entry._fields)
        dtypes = [pl.Float64, pl.String, *[pl.Int64] * 4, pl.Float64, pl.String, pl.Boolean]
        schema = dict(zip(names, dtypes, strict=True))
        frame = pl.DataFrame(rows, schema=schema, orient="row")
        frame = frame.with_columns(sim_t=pl.col("t") / self.time_scale)
        return frame.select("t", "sim_t", *names[1:])

    def max_in_window(
        self,
        window_s: float,
        *,
        what: Literal["requests", "tokens"] = "requests",
        admitted: bool = True,
        simulated: bool = False,
        down: bool | None = None,
    ) -> float:
        """Most requests (or charged tokens) arriving within any ``window_s`` seconds.

        ``admitted=True`` counts only requests the rate limiter let through (not 429s);
        ``simulated=True`` reads ``window_s`` in simulated seconds; ``down=True`` counts only
        requests that arrived during an outage (``False``: only the others).
        """
        rows = [
            r
            for r in self.entries()
            if (not admitted or r.status != 429) and (down is None or r.down == down)
        ]
        scale = self.time_scale if simulated else 1.0
        weights = [1.0 if what == "requests" else float(r.charged_tokens) for r in rows]
        return float(max_in_sliding_window([r.t / scale for r in rows], window_s, weights))
