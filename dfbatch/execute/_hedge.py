"""Tail defenses: a size-aware latency model, hedged duplicates on a budget, adaptive timeouts.

Every answered call reports ``(tokens, latency)``. ``LatencyModel`` fits a resistant line
``latency ~ a + b * tokens`` (medians of size buckets and the median slope between them, so the
tail it is meant to find does not bend it) over the last 256 calls, and the spread of
``latency / expected`` around it; beyond the biggest call seen it assumes latency grows in
proportion to tokens. A call is a straggler when its age passes its *own size's* expected
latency times the ``hedge_after`` quantile of that ratio, so a 20k-token request is not a
straggler at a duration that is ordinary for its size.

``TailState.plan(tokens, q)`` gives a call its ages (``Plan``): hedge after ``tail_after`` when
nothing is queued (the run's tail) and after ``outlier_after`` at any time; with no hedge sent,
cut the call at ``deadline`` (an adaptive timeout, never under ``TIMEOUT_FLOOR_S``; the
configured ``timeout`` still applies to each copy); after a hedge, cut both copies once the hedge
too has run ``stall_after``. A cut raises ``StragglerTimeoutError``: the batch retries as a
transient error. ``race`` runs the copies: the first answer wins and the other is cancelled, so
a row never gets two answers.

Budget: at most ``hedge_budget`` x attempts so far (+ ``SPARE_HEDGES`` for short runs, unless the
budget is 0) hedges;
and no hedge while work is queued and a rate bucket (TPM / RPM) is the binding limit, so a
duplicate never spends tokens that pending work needs.

Examples
--------
>>> state = TailState()
>>> for i in range(40):
...     state.observe(tokens=100 + 900 * (i % 2), latency=0.5 + 0.001 * (100 + 900 * (i % 2)))
>>> round(state.model.expected(100), 2), round(state.model.expected(1000), 2)
(0.6, 1.5)
>>> small, big = state.plan(100, 0.9), state.plan(1000, 0.9)
>>> small.tail_after < 1.0 < big.tail_after  # a big call is not late when a small one is
True
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from statistics import median
from typing import TypeVar

from dfbatch.errors import StragglerTimeoutError
from dfbatch.execute._limits import RateLimit

T = TypeVar("T")

WINDOW = 256  # recent calls the model fits
MIN_SAMPLES = 16  # no hedging / adaptive timeout before this many answered calls
BUCKET_MIN = 3  # calls a size bucket needs to count in the slope
OUTLIER_Q = 0.99  # an outlier: past this quantile of latency / expected ...
OUTLIER_K = 2.0  # ... times this (hedged at any time)
SPARE_HEDGES = 2  # hedges a short run may send beyond hedge_budget x attempts
TIMEOUT_FLOOR_S = 1.0  # the adaptive timeout is never shorter than this
TIMEOUT_K = 3.0  # no hedge sent: cut at 3 x the outlier age (about 7-10 x the expected latency)
STALL_K = 2.0  # a hedge sent: cut when the hedge too has run 2 x the outlier age
POLL_S, MAX_POLL_S = 0.05, 5.0  # a call that started before the model was fitted looks again


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

    def observe(self, tokens: float, latency: float) -> None:
        if latency > 0 and math.isfinite(latency):
            self.samples.append((max(0.0, float(tokens)), float(latency)))
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
        r = self.ratios
        return max(1.0, r[min(len(r) - 1, int(q * len(r)))]) if r else 1.0

    def _refit(self) -> None:
        n = len(self.samples)
        if n < MIN_SAMPLES or (self.ratios and self._stale < max(1, n // 16)):
            return
        self._stale = 0
        pts = list(self.samples)
        self.a, self.b = _resistant_line(pts)
        self.least = 0.25 * sorted(x for _, x in pts)[n // 4]
        self.cover = max(1.0, max(t for t, _ in pts))
        self.ratios = sorted(x / max(self.least, self.a + self.b * t) for t, x in pts)


def _resistant_line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``latency ~ a + b * tokens``: the median slope between the medians of
    size buckets (powers of two, >= ``BUCKET_MIN`` calls each, so a run of mostly small calls
    still sees its few big ones), and the median intercept of every call."""
    buckets: dict[int, list[tuple[float, float]]] = {}
    for t, x in pts:
        buckets.setdefault(int(math.log2(t + 1)), []).append((t, x))
    mids = [(median(t for t, _ in b), median(x for _, x in b))
            for _, b in sorted(buckets.items()) if len(b) >= BUCKET_MIN]
    slopes = [(x2 - x1) / (t2 - t1) for i, (t1, x1) in enumerate(mids)
              for t2, x2 in mids[i + 1:] if t2 > t1]
    b = max(0.0, median(slopes)) if slopes else 0.0
    return max(0.0, median(x - b * t for t, x in pts)), b


@dataclass(frozen=True)
class Plan:
    """The ages (seconds since the attempt started) at which ``race`` acts."""

    tail_after: float
    outlier_after: float
    deadline: float
    stall_after: float

    def hedge_due(self, age: float, queued: bool) -> bool:
        return age >= self.outlier_after or (age >= self.tail_after and not queued)

    def cut_at(self, hedged_at: float | None) -> float:
        return self.deadline if hedged_at is None else hedged_at + self.stall_after

    def next_wake(self, age: float, hedged_at: float | None) -> float:
        """Seconds from ``age`` to the next decision (a waiting straggler is polled)."""
        marks = [self.cut_at(hedged_at)]
        if hedged_at is None:
            marks += [self.tail_after, self.outlier_after]
            if age >= self.tail_after:  # due in the tail, but work was queued: look again
                marks.append(age + max(0.01, self.tail_after / 4))
        return max(0.0, min(m for m in marks if m > age) - age) if max(marks) > age else 0.0


@dataclass(eq=False)
class TailState:
    """The run's latency model and hedge counts, shared by its pools (``RunLimits.tail``)."""

    model: LatencyModel = field(default_factory=LatencyModel)
    attempts: int = 0
    hedges: int = 0

    def observe(self, tokens: float, latency: float) -> None:
        self.model.observe(tokens, latency)

    def plan(self, tokens: float, q: float) -> Plan | None:
        """The plan for a call of ``tokens``; ``None`` until the model is fitted."""
        m = self.model
        if not m.ready:
            return None
        e = m.expected(tokens)
        tail = e * m.ratio(q)
        outlier = max(e * m.ratio(OUTLIER_Q), 1.5 * tail)
        deadline = max(TIMEOUT_FLOOR_S, TIMEOUT_K * outlier, 1.5 * e * m.ratio(1.0))
        stall = max(TIMEOUT_FLOOR_S, STALL_K * outlier)
        # a duplicate while work is queued takes capacity from it: only for a clear outlier
        return Plan(tail, OUTLIER_K * outlier, deadline, stall)

    def may_hedge(self, budget: float, *, queued: bool,
                  rates: tuple[RateLimit | None, ...], units: tuple[float, ...]) -> bool:
        """Within budget, and no binding rate bucket that queued work needs? Counts the hedge."""
        spare = SPARE_HEDGES if budget > 0 else 0  # hedge_budget=0: no hedge at all
        if self.hedges >= budget * self.attempts + spare:
            return False
        if queued and any(binding(r, u) for r, u in zip(rates, units, strict=True)):
            return False
        self.hedges += 1
        return True


def binding(rate: RateLimit | None, units: float) -> bool:
    """Is this bucket what paces the run (acquires wait on it, or it cannot pay ``units`` now)?"""
    if rate is None or not rate.known:
        return False
    return rate.recent_wait > 0.01 or rate.level < units


async def race(call: Callable[[], Awaitable[T]], hedge: Callable[[], Awaitable[T]],
               plan: Callable[[], Plan | None], *, queued: Callable[[], bool],
               may_hedge: Callable[[bool], bool]) -> T:
    """Run ``call``; per ``plan()`` (asked again at each decision, so a call that started before
    the model was fitted is covered too), add ``hedge`` or cut both. The first answer wins; the
    other copy is cancelled. Every copy failed: the first copy's error is raised."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first: asyncio.Future[T] = asyncio.ensure_future(call())
    tasks, pending = [first], {first}
    hedged_at: float | None = None
    poll = POLL_S  # no plan yet: look again after 0.05 s, 0.1 s, 0.2 s ...
    try:
        while pending:
            age = loop.time() - t0
            p = plan()
            if p is None:
                wake, poll = poll, min(2 * poll, MAX_POLL_S)
            else:
                wake = p.next_wake(age, hedged_at)
            done, pending = await asyncio.wait(pending, timeout=wake,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result()
            if done or p is None:
                continue  # one copy failed: wait for the other (or raise below); or no plan
            age = loop.time() - t0
            if hedged_at is None and p.hedge_due(age, q := queued()) and may_hedge(q):
                hedged_at = age
                copy: asyncio.Future[T] = asyncio.ensure_future(hedge())
                tasks.append(copy)
                pending.add(copy)
            elif age >= p.cut_at(hedged_at):
                msg = (f"the call ran {age:.1f} s, far past the latency expected for its size "
                       f"(adaptive timeout, hedge_after; set hedge_after=None to turn it off)")
                raise StragglerTimeoutError(msg)
        return first.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
