"""Tail defenses: hedged duplicates, restarts and adaptive timeouts, on one budget.

Every answered call reports ``(tokens, latency)`` to ``LatencyModel`` (``_latency``): a size-aware
expected latency and the spread of ``latency / expected``. A call is a straggler when its age
passes its *own size's* expected latency times the ``hedge_after`` quantile of that ratio, so a
20k-token request is not a straggler at a duration that is ordinary for its size.

``TailState.plan(tokens, q, budget)`` gives a call its ages (``Plan``): hedge after
``tail_after`` when no work waits (nothing queued and a free in-flight slot: the run's tail) and
after ``outlier_after`` at any time; with no hedge sent, cut the call at ``deadline`` (an
adaptive timeout, never under ``TIMEOUT_FLOOR_S``; the configured ``timeout`` still applies to
each copy); after a hedge, cut both copies once the hedge too has run ``stall_after``. A cut
raises ``StragglerTimeoutError``: the batch retries as a transient error.

Under a heavy tail (the spread's shape says a call that old is expected to run longer than a
fresh one: ``restart_ratio``), a call still running at ``restart_after`` while work waits is cut
and resent at once (a *restart*: it frees its slot for a fresh draw instead of holding it for the
tail), once per batch; and in the run's tail a call is hedged as soon as a copy is expected to
finish first (``drain_ratio``), not only past the ``hedge_after`` quantile. If resent calls turn
out as slow as the cut ones (the latency follows the rows, not chance), restarts stop for the
run. Under a light tail neither happens: a resend would only lose the time spent.

Budget: hedges and restarts together are extra calls, at most ``hedge_budget`` x attempts so far
(a short run may still send ``SPARE_HEDGES`` hedges, unless the budget is 0); restarts take at most
``RESTART_SHARE`` of it; restarts and hedges both leave ``DRAIN_RESERVE`` extra calls per other
call in flight for the run's last calls, where a straggler costs the makespan most. No hedge
while work is queued and a rate bucket (TPM / RPM) is the binding limit, so a duplicate never
spends tokens that pending work needs.
``race`` (``_race``) runs the copies: the first answer wins and the other is cancelled, so a
row never gets two answers; a caller's many calls get a race only once one is late (``Pending``).

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

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dfbatch.execute._latency import LatencyModel, drain_ratio, restart_ratio
from dfbatch.execute._race import Wakes, race  # (re-exported: where the races moved)
from dfbatch.execute._rate import RateLimit

__all__ = ["Plan", "TailState", "Wakes", "binding", "has_room", "race"]

OUTLIER_Q = 0.99  # an outlier: past this quantile of latency / expected ...
OUTLIER_K = 2.0  # ... times this (hedged at any time)
SPARE_HEDGES = 2  # hedges a short run may send even where hedge_budget x attempts is less
TIMEOUT_FLOOR_S = 1.0  # the adaptive timeout is never shorter than this
TIMEOUT_K = 3.0  # no hedge sent: cut at 3 x the outlier age (about 7-10 x the expected latency)
STALL_K = 2.0  # a hedge sent: cut when the hedge too has run 2 x the outlier age
RESTART_SHARE = 0.8  # restarts may use this share of the extra-call budget (the rest: hedges)
DRAIN_RESERVE = 0.5  # restarts and hedges leave this many extra calls per other call in
#                     flight for the run's last calls
SLOW_RESENDS = 2  # this many resent calls as slow as the cut ones (and >= 1/3 of them): the
#                   latency follows the rows, not chance, and restarts stop for the run


@dataclass(frozen=True)
class Plan:
    """The ages (seconds since the attempt started) at which ``race`` acts."""

    tail_after: float
    outlier_after: float
    deadline: float
    stall_after: float
    restart_after: float = math.inf  # with work queued: cut the call and resend it at once

    def hedge_due(self, age: float, queued: bool) -> bool:
        return age >= self.outlier_after or (age >= self.tail_after and not queued)

    def cut_at(self, hedged_at: float | None) -> float:
        return self.deadline if hedged_at is None else hedged_at + self.stall_after

    def next_wake(self, age: float, hedged_at: float | None) -> float:
        """Seconds from ``age`` to the next decision (a waiting straggler is polled)."""
        cut = self.cut_at(hedged_at)
        nxt = cut if cut > age else math.inf
        if hedged_at is None:
            if age < self.tail_after < nxt:
                nxt = self.tail_after
            if age < self.outlier_after < nxt:
                nxt = self.outlier_after
            if age < self.restart_after < nxt:
                nxt = self.restart_after
            if age >= self.tail_after:  # due in the tail, but work was queued: look again
                nxt = min(nxt, age + max(0.01, self.tail_after / 4))
            if age >= self.restart_after:  # due, but no budget or nothing queued: look again
                nxt = min(nxt, age + max(0.01, self.restart_after / 4))
        return nxt - age if nxt < math.inf else 0.0


@dataclass(eq=False)
class TailState:
    """The run's latency model and hedge counts, shared by its pools (``RunLimits.tail``)."""

    model: LatencyModel = field(default_factory=LatencyModel)
    attempts: int = 0
    hedges: int = 0
    restarts: int = 0  # calls cut and resent (``restart_after``): extra calls, like hedges
    running: int = 0  # calls in flight (what the run's tail will need hedges for)
    restart_ok: bool = True  # False once resent calls proved as slow as the cut ones
    resends: int = 0  # resent calls answered so far ...
    slow_resends: int = 0  # ... of which ran at least as long as their cut first copy had
    _cut: dict[int, tuple[Any, float]] = field(default_factory=dict, repr=False)
    _plans: dict[tuple[float, float, float], Plan] = field(default_factory=dict, repr=False)
    _fit: int = -1  # the model's fit the memoized plans come from

    def observe(self, tokens: float, latency: float, key: object = None) -> None:
        """An answered call; ``key``: its batch (was it resent after a restart, and was the
        resend fast, as a fresh chance should be?)."""
        self.model.observe(tokens, latency)
        got = self._cut.pop(id(key), None) if key is not None and self._cut else None
        if got is None or got[0] is not key:
            return
        self.resends += 1
        if latency >= got[1]:
            self.slow_resends += 1
            if self.slow_resends >= SLOW_RESENDS and 3 * self.slow_resends >= self.resends:
                self.restart_ok = False  # latency follows the rows: a resend is no fresh chance
                self._plans.clear()

    def plan(self, tokens: float, q: float, budget: float = 0.0) -> Plan | None:
        """The plan for a call of ``tokens``; ``None`` until the model is fitted. ``budget``:
        the extra-call budget (``hedge_budget``), of which restarts may use a share."""
        m = self.model
        if not m.ready:
            return None
        m._refit()
        if m.fits != self._fit:  # plans are asked for at every call: kept per fit and size
            self._plans.clear()
            self._fit = m.fits
        got = self._plans.get((tokens, q, budget))
        if got is None:
            got = self._plans[(tokens, q, budget)] = self._plan(tokens, q, budget)
        return got

    def _plan(self, tokens: float, q: float, budget: float) -> Plan:
        m = self.model
        e = m.expected(tokens)
        late = e * m.ratio(q)
        outlier = max(e * m.ratio(OUTLIER_Q), 1.5 * late)
        deadline = max(TIMEOUT_FLOOR_S, TIMEOUT_K * outlier, 1.5 * e * m.ratio(1.0))
        stall = max(TIMEOUT_FLOOR_S, STALL_K * outlier)
        tail, restart = late, math.inf
        shape = m.shape()
        if shape is not None:
            # heavy tail: in the run's tail, hedge as soon as a copy is expected to finish
            # well before the call; with work queued, cut and resend where that saves time
            tail = min(late, e * drain_ratio(*shape))
            share = budget * RESTART_SHARE
            if self.restart_ok and 0 < share < 0.5:
                restart = e * restart_ratio(*shape, 1 - share)
        # a duplicate while work is queued takes capacity from it: only for a clear outlier
        return Plan(tail, OUTLIER_K * outlier, deadline, stall, restart)

    def may_restart(self, budget: float, key: object, tokens: float, age: float) -> bool:
        """May this call (of batch ``key``, ``age`` s old) be cut and resent? Once per batch,
        within ``RESTART_SHARE`` of the budget and, with hedges, within the budget. Counts it,
        and tells the model the call takes at least ``age`` (so its quantiles stay true)."""
        if not self.restart_ok:
            return False
        got = self._cut.get(id(key))
        if got is not None and got[0] is key:
            return False  # its resend runs to the end (a slow batch may be slow by its rows)
        # a straggler in the run's tail costs the makespan far more than one mid-run costs
        # throughput: keep budget for a hedge of half the calls in flight
        extra = self.hedges + self.restarts + 1 + DRAIN_RESERVE * self.running
        if self.restarts + 1 > budget * RESTART_SHARE * self.attempts or \
                extra > budget * self.attempts:
            return False
        self.restarts += 1
        self._cut[id(key)] = (key, age)  # (held: its id is not reused meanwhile)
        self.model.observe(tokens, age)
        return True

    def ordinary_within(self, tokens: float, seconds: float | None) -> bool:
        """Do calls of ``tokens`` finish well within ``seconds`` (at the outlier
        quantile)? A timeout of such a call is a hang, not a sign its batch is too big."""
        m = self.model
        if seconds is None:
            return False
        if not m.ready:  # early: calls at least half as big (scaled) ended well within it
            seen = [x * max(1.0, tokens / max(1.0, t)) for t, x in m.samples if 2 * t >= tokens]
            return len(seen) >= 2 and max(seen) < 0.8 * seconds
        return m.expected(tokens) * m.ratio(OUTLIER_Q) < seconds

    def may_hedge(self, budget: float, *, queued: bool,
                  rates: tuple[RateLimit | None, ...], units: tuple[float, ...]) -> bool:
        """Within budget, and no binding rate bucket that queued work needs? Counts the hedge.

        A hedge leaves ``DRAIN_RESERVE`` extra calls per other call in flight: the calls still
        running when the run is down to its last few set the makespan, so the budget goes to
        them, not to the first stragglers of a long drain (with 30 calls in flight and 5 extra
        calls left, a hedge waits until 9 remain). Under a light tail those are the calls sent
        last; under a heavy one, the stragglers themselves: a hedge sent at once to every call
        past its due age as the drain begins would spend a short run's few extra calls before
        the one that ends last is even late (300 rows, lognormal sigma = 1: 0.86x -> 0.71x
        ``asyncio.gather``'s makespan, geometric mean over 150 seeds)."""
        spare = SPARE_HEDGES if budget > 0 else 0  # hedge_budget=0: no hedge at all
        allowed = max(budget * self.attempts, spare)
        extra = self.hedges + self.restarts + 1
        if extra > allowed:  # never past it
            return False
        # the makespan is set by the calls that finish last: keep the reserve for them
        if extra + DRAIN_RESERVE * max(0, self.running - 1) > allowed:
            return False
        if queued and any(binding(r, u) for r, u in zip(rates, units, strict=True)):
            return False
        self.hedges += 1
        return True


def has_room(limits: Iterable[object]) -> bool:
    """Has every capacity limit among ``limits`` a free unit (so nothing waits for one, and a
    hedge sent now delays no work taken from the queue)?"""
    return all(getattr(lim, "in_use", 0.0) < getattr(lim, "capacity", math.inf)
               for lim in limits)


def binding(rate: RateLimit | None, units: float) -> bool:
    """Is this bucket what paces the run (acquires wait on it, or it cannot pay ``units`` now)?"""
    if rate is None or not rate.known:
        return False
    return rate.recent_wait > 0.01 or rate.level < units
