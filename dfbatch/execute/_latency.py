"""The latency model of the tail defenses (``_hedge``): expected latency by size, its spread,
and where a heavy tail makes a fresh call worth more than waiting.

``LatencyModel`` fits a resistant line ``latency ~ a + b * tokens`` (medians of size buckets and
the median slope between them, so the tail it is meant to find does not bend it) over the last
256 answered calls, and the spread of ``latency / expected`` around it; beyond the biggest call
seen it assumes latency grows in proportion to tokens. ``shape`` reads a lognormal off the
spread's body (median, 90th percentile), where calls cut further out do not bend it.

``restart_ratio`` and ``drain_ratio`` decide from that shape. A call's expected *remaining*
time grows with its age under a heavy tail (lognormal sigma ~1: past its 96th percentile a call
is expected to run twice a fresh call's mean) and shrinks under a light one (sigma <= 0.6: never
more than 0.8 x the mean). So cutting a call and resending it saves time only under a heavy tail,
and only past some age; under a light tail it only loses the time spent.

Examples
--------
>>> restart_ratio(0.0, 1.0, 0.96) < 6.0  # heavy: resend calls past their 96th percentile
True
>>> restart_ratio(0.0, 0.35, 0.96), drain_ratio(0.0, 0.35)  # light: never
(inf, inf)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from statistics import NormalDist, median

import numpy as np

WINDOW = 256  # recent calls the model fits
MIN_SAMPLES = 16  # no hedging / adaptive timeout before this many answered calls
BUCKET_MIN = 3  # calls a size bucket needs to count in the slope
REFIT_S = 0.1  # refit at most this often (a fit costs ~0.5 ms; cheap calls come by thousands)
RESTART_GAIN = 0.97  # restart only where that is expected to save >= 3% of the calls' time
DRAIN_MRL = 1.0  # in the run's tail, hedge a call expected to run longer than a fresh copy
_Z90 = NormalDist().inv_cdf(0.9)


class LatencyModel:
    """Expected latency of a call of ``tokens`` tokens, and the spread around it."""

    def __init__(self, window: int = WINDOW) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.a = 0.0  # seconds
        self.b = 0.0  # seconds per token
        self.least = 0.0  # the smallest expected latency (a fit's intercept may be ~0)
        self.cover = 1.0  # the biggest call (tokens) the fit has seen
        self.ratios: list[float] = []  # sorted latency / expected of the samples
        self._stale = 0
        self.fits = 0  # refits so far (what memos of a fit compare with)
        self._fit_at = -math.inf
        self._memo: dict[float, float] = {}

    def observe(self, tokens: float, latency: float) -> None:
        if 0.0 < latency < math.inf:  # (a NaN fails both)
            self.samples.append((float(tokens) if tokens > 0.0 else 0.0, float(latency)))
            self._stale += 1

    @property
    def ready(self) -> bool:
        return len(self.samples) >= MIN_SAMPLES

    def expected(self, tokens: float) -> float:
        """Beyond the biggest call seen, latency is assumed to grow at least in proportion to
        tokens (a model fitted on small calls must not call an unseen big one late)."""
        self._refit()
        line = max(self.least, self.a + self.b * tokens)
        if tokens <= self.cover:
            return line
        return max(line, max(self.least, self.a + self.b * self.cover) * tokens / self.cover)

    def ratio(self, q: float) -> float:
        """The ``q`` quantile of latency / expected (1.0 before any fit)."""
        self._refit()
        got = self._memo.get(q)
        if got is None:  # (asked for the same few quantiles at every call: kept per fit)
            r = self.ratios
            got = self._memo[q] = max(1.0, r[min(len(r) - 1, int(q * len(r)))]) if r else 1.0
        return got

    def shape(self) -> tuple[float, float] | None:
        """``(mu, sigma)`` of log(latency / expected), from the median and the 90th percentile
        of the spread (its body: calls cut further out do not bend it); None before a fit."""
        self._refit()
        r = self.ratios
        if not r:
            return None
        mid, high = r[len(r) // 2], r[int(0.9 * len(r))]
        if not 0 < mid < high:
            return None
        return math.log(mid), math.log(high / mid) / _Z90

    def _refit(self) -> None:
        n = len(self.samples)
        if n < MIN_SAMPLES or (self.ratios and self._stale < max(1, n // 8)):
            return
        if self.ratios and _now() < self._fit_at + REFIT_S:
            self._stale -= max(1, n // 32)  # (look at the clock again after a few more calls)
            return
        self._fit_at = _now()
        self._stale = 0
        self.fits += 1
        self._memo.clear()
        pts = np.array(self.samples, dtype=np.float64)
        t, x = pts[:, 0], pts[:, 1]
        self.a, self.b = _resistant_line(t, x)
        self.least = 0.25 * float(np.partition(x, n // 4)[n // 4])
        self.cover = max(1.0, float(t.max()))
        self.ratios = np.sort(x / np.maximum(self.least, self.a + self.b * t)).tolist()


def _now() -> float:
    """The running loop's clock (a virtual one in simulations), else the monotonic clock."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _resistant_line(t: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` of ``latency ~ a + b * tokens``: the median slope between the medians of
    size buckets (powers of two, >= ``BUCKET_MIN`` calls each, so a run of mostly small calls
    still sees its few big ones), and the median intercept of every call."""
    keys = np.floor(np.log2(t + 1)).astype(np.int64)
    mids = []
    for k in np.unique(keys).tolist():  # sorted
        inside = keys == k
        if int(inside.sum()) >= BUCKET_MIN:
            mids.append((float(np.median(t[inside])), float(np.median(x[inside]))))
    slopes = [(x2 - x1) / (t2 - t1) for i, (t1, x1) in enumerate(mids)
              for t2, x2 in mids[i + 1:] if t2 > t1]
    b = max(0.0, median(slopes)) if slopes else 0.0
    # never steeper than latency in proportion to tokens: a few slow calls in a sparse bucket
    # (the slow ones finish last) must not tilt the line until small calls look "late"
    b = min(b, float(np.median(x / np.maximum(1.0, t))))
    return max(0.0, float(np.median(x - b * t))), b


def restart_ratio(mu: float, sigma: float, p: float) -> float:
    """Where to cut and resend calls whose latency / expected is lognormal(``mu``, ``sigma``):
    at its ``p`` quantile, if restarting there is expected to save >= 1 - ``RESTART_GAIN`` of
    the calls' time (a heavy tail: a call that old is expected to run longer than a fresh one
    takes), else never (``inf``; a light tail: a resend would only lose the time spent)."""
    n = NormalDist()
    log_tau = mu + n.inv_cdf(p) * sigma
    mean = math.exp(mu + sigma * sigma / 2)
    below = mean * n.cdf((log_tau - mu - sigma * sigma) / sigma)  # E[R; R < tau]
    per_answer = (below + math.exp(log_tau) * (1 - p)) / p  # time per answer, resending at tau
    return math.exp(log_tau) if per_answer <= RESTART_GAIN * mean else math.inf


def drain_ratio(mu: float, sigma: float) -> float:
    """The smallest age (latency / expected; quantiles 0.5 .. 0.99) at which a lognormal
    call's expected remaining time exceeds ``DRAIN_MRL`` x a fresh call's (``inf``: never)."""
    n = NormalDist()
    mean = math.exp(mu + sigma * sigma / 2)
    for p in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99):
        log_a = mu + n.inv_cdf(p) * sigma
        beyond = mean * n.cdf((mu + sigma * sigma - log_a) / sigma)  # E[R; R > a]
        if beyond / (1 - p) - math.exp(log_a) >= DRAIN_MRL * mean:
            return math.exp(log_a)
    return math.inf
