"""Composable limits: concurrency, bytes in flight, request rate, token rate, adaptive (AIMD).

Every limit has the same two-step protocol (aiometer's meters): ``await acquire(cost)`` before a
call starts, ``release(cost, outcome)`` when it ends. The pool stacks them; none of them knows
about the others, and none of them polls: waiters sleep on a future or for the exact time a
bucket needs to refill.

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._limits import Cost, Outcome, RateLimit
>>> async def demo():
...     rpm = RateLimit(per_minute=6000, burst=0.001)  # 100 requests/s, burst of 6
...     loop = asyncio.get_running_loop(); t0 = loop.time()
...     for _ in range(16):
...         await rpm.acquire(Cost(tokens=0))
...     return round(loop.time() - t0, 1)
>>> asyncio.run(demo())  # 6 at once, then 10 more at 100/s
0.1
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dfbatch.execute._headers import RateHints


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call will use: a request, its estimated tokens, its bytes in memory."""

    tokens: int = 0
    nbytes: int = 0
    requests: int = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one call ended, for limits that learn (AIMD) or correct estimates (TPM)."""

    ok: bool = True
    rate_limited: bool = False
    timed_out: bool = False
    retry_after: float | None = None
    actual_tokens: int | None = None  # real usage when the backend reports it
    started_seq: int = 0
    overloaded: bool = False  # an overloaded server's 429 / 503: fewer at once, same rate
    hints: RateHints | None = None  # the answer's rate-limit headers (limits learn from them)


class Limit(Protocol):
    async def acquire(self, cost: Cost) -> None: ...

    def release(self, cost: Cost, outcome: Outcome | None) -> None: ...


_JOURNAL_S = 120.0  # charges older than this are forgotten (a reply that late is not synced)


class CapacityLimit:
    """At most ``capacity`` units in use, where a call's units are ``weight(cost)``.

    ``weight`` defaults to 1 per call (a concurrency limit). A call heavier than the whole
    capacity still runs, alone, so nothing can wait forever (bytes limit). FIFO fair.
    """

    def __init__(self, capacity: float, weight: Callable[[Cost], float] | None = None):
        self.capacity = float(capacity)
        self.in_use = 0.0
        self.max_in_use = 0.0
        self._weight = weight or (lambda cost: 1.0)
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()

    def _fits(self, w: float) -> bool:
        return self.in_use + w <= self.capacity or self.in_use == 0

    async def acquire(self, cost: Cost) -> None:
        w = self._weight(cost)
        if not self._waiters and self._fits(w):
            self._take(w)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (w, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give(w)  # granted, then cancelled: hand the units back
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        self._give(self._weight(cost))

    def force_acquire(self, cost: Cost) -> None:
        """Take units without waiting (may exceed capacity briefly)."""
        self._take(self._weight(cost))

    def set_capacity(self, capacity: float) -> None:
        self.capacity = float(capacity)
        self._wake()

    def _take(self, w: float) -> None:
        self.in_use += w
        self.max_in_use = max(self.max_in_use, self.in_use)

    def _give(self, w: float) -> None:
        self.in_use = max(0.0, self.in_use - w)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            w, fut = self._waiters.popleft()
            if fut.done():
                continue
            self._take(w)
            fut.set_result(None)


class RateLimit:
    """A token bucket refilled at an effective rate that learns how the provider enforces.

    Units are requests (``tokens=False``) or tokens (``tokens=True``: a call is charged its
    estimated tokens up front and corrected by ``Outcome.actual_tokens`` afterwards).

    - **Burst.** The bucket starts holding one second's worth (``start_s``; never more than
      ``burst`` minutes), since many providers enforce a per-minute limit per second. Headers
      that show a bigger bucket (``x-ratelimit-remaining-*``, see ``sync`` / ``observe``) let
      it grow, up to a minute's worth. A call larger than the bucket waits for a full bucket
      and leaves it in debt (never deadlocks).
    - **AIMD on the rate.** A rate-limit 429 for a call this bucket paced means the provider
      counts differently: the effective ``rate`` drops to ``decrease`` x itself (once per
      episode: 429s of calls sent before the drop are ignored) and the bucket shrinks back to
      one second's worth; clean calls regrow the rate additively, back to the ceiling within
      ``regrow_s`` seconds.
    - **Unknown limit.** ``per_minute=None`` lets everything through until headers state a
      ``x-ratelimit-limit-*`` (adopted) or a 429 arrives (the rate becomes ``decrease`` x the
      rate recently sent, then regrows with no ceiling).

    So in any window of ``T`` seconds at most ``capacity + per_minute * T / 60`` units go out.
    """

    def __init__(
        self,
        per_minute: float | None,
        *,
        tokens: bool = False,
        burst: float = 0.1,
        start_s: float = 1.0,
        decrease: float = 0.7,
        regrow_s: float = 60.0,
    ):
        self.tokens = tokens
        self.burst = burst
        self.start_s = start_s
        self.decrease = decrease
        self.regrow_s = regrow_s
        self.per_minute = 0.0  # the ceiling (told, or stated by headers); 0 while unknown
        self.rate = math.inf  # effective units per second
        self.capacity = math.inf
        self.level = math.inf
        self.recent_wait = 0.0  # moving average of seconds an acquire waited (is it binding?)
        self.server_capacity = 0.0  # learned from x-ratelimit-remaining-*: provider bucket size
        self.decreases = 0
        # unknown limit: a 429 makes the rate a guess (decrease x what was sent); off, an
        # unknown limit waits for headers and leaves 429s to the pause and concurrency AIMD
        self.guess = True
        self._admitted: deque[tuple[float, float]] = deque()  # (time, units) answered
        self._slope = 0.0  # regrowth, units/s per second
        self._decreased_at = -math.inf
        self._grown_at = 0.0
        self._stamp: float | None = None
        self._lock = asyncio.Lock()
        self._charges: list[tuple[float, float]] = []  # (time, units) of charge number i + base
        self._base = 0  # charge number of self._charges[0]
        self._last: contextvars.ContextVar[int] = contextvars.ContextVar("charge", default=-1)
        if per_minute is not None:
            self.set_ceiling(per_minute)

    @property
    def known(self) -> bool:
        return math.isfinite(self.rate)

    def set_ceiling(self, per_minute: float) -> None:
        """Adopt a limit (told, or stated by ``x-ratelimit-limit-*``); a lower one wins."""
        per_minute = float(per_minute)
        if per_minute <= 0 or (self.per_minute and per_minute >= self.per_minute):
            return
        self.per_minute = per_minute
        self._slope = per_minute / 60.0 / self.regrow_s
        self.rate = min(self.rate, per_minute / 60.0)
        self.capacity = min(self.capacity, self._small_bucket())
        self.level = min(self.level, self.capacity)

    def _small_bucket(self) -> float:
        per_minute = self.rate * 60.0
        return max(1.0, min(per_minute * self.burst, self.rate * self.start_s))

    def _units(self, cost: Cost) -> float:
        return float(cost.tokens if self.tokens else cost.requests)

    def _refill(self, now: float) -> None:
        if self._stamp is not None and self.known:
            self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, cost: Cost) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with self._lock:  # FIFO: the head waits for the refill, the rest queue behind
            self._refill(loop.time())
            while self.level < (need := min(self._units(cost), self.capacity)):
                await asyncio.sleep((need - self.level) / self.rate)
                self._refill(loop.time())
            self.level -= self._units(cost)
            self._journal(loop.time(), self._units(cost))
        self.recent_wait += 0.1 * ((loop.time() - t0) - self.recent_wait)

    def _journal(self, now: float, units: float) -> None:
        """Remember recent charges (for ``sync``); the caller's task remembers its number."""
        self._last.set(self._base + len(self._charges))
        self._charges.append((now, units))
        stale = 0
        while stale < len(self._charges) and self._charges[stale][0] < now - _JOURNAL_S:
            stale += 1
        if stale > len(self._charges) // 2:  # amortized O(1) pruning
            del self._charges[:stale]
            self._base += stale

    def _my_charge(self) -> tuple[float, float] | None:
        i = self._last.get() - self._base
        return self._charges[i] if 0 <= i < len(self._charges) else None

    def sync(self, remaining: float, cost: Cost, *, lower_only: bool = False) -> None:
        """The provider said its bucket held ``remaining`` right after admitting this task's call.

        Learn the provider's bucket size (at least ``remaining`` + this call) and set our level
        to the provider's level now, by replaying the charges we sent after that call. So a
        provider with a full-minute bucket gets used from the start, and one that enforces
        its limit per second (small bucket) is not overrun. After a rate-limit 429 the
        headers are not trusted to grow the bucket for ``regrow_s`` seconds.
        """
        mine = self._my_charge()
        if mine is None or not self.known:
            return
        now = asyncio.get_running_loop().time()
        if not lower_only:
            self.server_capacity = max(self.server_capacity, remaining + self._units(cost))
            trusted = now >= self._decreased_at + self.regrow_s
            bucket = min(self.per_minute or math.inf, self.server_capacity)
            self.capacity = max(1.0, bucket if trusted else min(bucket, self._small_bucket()))
        i = self._last.get() - self._base
        level, t = remaining, mine[0]
        for ts, units in self._charges[i + 1:]:
            level = min(self.capacity, level + (ts - t) * self.rate) - units
            t = ts
        self._refill(now)
        level = min(self.capacity, level + (now - t) * self.rate)
        self.level = min(self.level, level) if lower_only else level

    def observe(self, hints: RateHints, cost: Cost) -> None:
        """Learn from one answer's headers: adopt the stated limit, sync to ``remaining``."""
        limit = hints.limit(self.tokens)
        if limit is not None and limit > 0:
            self.set_ceiling(limit)
        remaining = hints.remaining(self.tokens)
        if remaining is not None:
            # told a lower limit than the provider's: its bucket says nothing about ours,
            # except that it may be emptier (shared with other clients)
            ours = bool(self.per_minute) and limit is not None and limit > self.per_minute
            self.sync(remaining, cost, lower_only=ours)

    def on_rate_limited(self, hints: RateHints | None = None) -> bool:
        """A rate-limit 429 came back for this task's call: lower the effective rate, once per
        episode. Skipped when the headers show the *other* limit ran out. Returns whether the
        rate was lowered."""
        mine = self._my_charge()
        if mine is None or mine[0] < self._decreased_at:
            return False
        if hints is not None and self._other_ran_out(hints):
            return False
        now = asyncio.get_running_loop().time()
        if not self.known:
            if not self.guess:
                return False
            admitted = self._admitted_rate(now)
            if admitted <= 0:
                return False
            # what the provider let through while it refused the rest: at most its limit
            self.rate = admitted / self.decrease
            self._slope = admitted / self.regrow_s
        self.rate = max(self._floor(), self.rate * self.decrease)
        self.capacity = self._small_bucket()
        self._refill(now)
        self.level = min(self.level, self.capacity)
        self._decreased_at = self._grown_at = now
        self.decreases += 1
        return True

    def _other_ran_out(self, hints: RateHints) -> bool:
        mine, other = hints.remaining(self.tokens), hints.remaining(not self.tokens)
        return other is not None and other < 1 and mine is not None and mine >= 1

    def _floor(self) -> float:
        return (self.per_minute / 60.0 / 20.0) if self.per_minute else 1e-3

    def _admitted_rate(self, now: float, window: float = 10.0) -> float:
        """Units per second of calls answered (not refused) over the last ``window`` seconds;
        0 while the first charge is under a second old."""
        while self._admitted and self._admitted[0][0] < now - window:
            self._admitted.popleft()
        if not self._charges or now - self._charges[0][0] < 1.0 or not self._admitted:
            return 0.0
        span = max(1.0, now - self._admitted[0][0])
        return sum(u for _, u in self._admitted) / span

    def _recent_rate(self, now: float, window: float = 10.0) -> float:
        """Units per second sent over the last ``window`` seconds (at least one second; 0
        while the first charge is under a second old)."""
        recent = [(t, u) for t, u in self._charges if t >= now - window]
        if not recent or now - self._charges[0][0] < 1.0:
            return 0.0  # less than a second of history says nothing about a rate
        span = max(1.0, now - recent[0][0])
        return sum(u for _, u in recent) / span

    def _regrow(self) -> None:
        now = asyncio.get_running_loop().time()
        ceiling = self.per_minute / 60.0 if self.per_minute else math.inf
        if self.known and self.rate < ceiling:
            self.rate = min(ceiling, self.rate + self._slope * max(0.0, now - self._grown_at))
        self._grown_at = now

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        if outcome is None:
            return
        if self.tokens and outcome.actual_tokens is not None and self.known:
            # refund (or charge) the difference between the estimate and the real usage
            self.level = min(self.capacity, self.level + cost.tokens - outcome.actual_tokens)
        if outcome.rate_limited:
            self.on_rate_limited(outcome.hints)
        elif outcome.ok:
            self._regrow()
            if not self.known:  # (what a guess of the rate would start from)
                now = asyncio.get_running_loop().time()
                self._admitted.append((now, self._units(cost)))
        if outcome.hints is not None:
            self.observe(outcome.hints, cost)


class AdaptiveLimit:
    """AIMD concurrency: halve on a 429 / timeout, +1 per window of successes, up to ``maximum``.

    A 429 also pauses new sends for the server's ``retry_after``. Only one decrease per
    congestion episode: 429s from calls that started before the last decrease are ignored.
    When an RPM / TPM bucket paces the sends (``rate_known``), a rate-limit 429 only pauses:
    halving concurrency would not send fewer requests per minute, only slower ones.
    """

    def __init__(self, maximum: int, *, minimum: int = 1, initial: int | None = None):
        self.maximum = maximum
        self.minimum = max(1, minimum)
        self.limit = float(initial if initial is not None else maximum)
        self._slots = CapacityLimit(math.floor(self.limit))
        self._seq = 0
        self._decreased_at_seq = -1
        self.pause_until = 0.0
        self.decreases = 0
        self.rate_known = False

    @property
    def in_use(self) -> float:
        return self._slots.in_use

    async def acquire(self, cost: Cost) -> None:
        await self._sit_out_pause()
        await self._slots.acquire(cost)
        try:  # a 429 may have paused sends while this call waited for its slot
            await self._sit_out_pause()
        except BaseException:
            self._slots.release(cost)
            raise
        self._seq += 1

    async def _sit_out_pause(self) -> None:
        loop = asyncio.get_running_loop()
        # a timed wait for a 429's retry-after, re-checked because a later 429 may extend it
        while (wait := self.pause_until - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)

    def next_seq(self) -> int:
        """Sequence number of the call that acquired last (pass it back in its Outcome)."""
        return self._seq

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        self._slots.release(cost)
        if outcome is not None:
            self.observe(outcome)

    def observe(self, outcome: Outcome) -> None:
        """Learn from how one call ended, without releasing a slot (``release`` calls it).

        The Ray engine holds a slot per dispatched batch and feeds it every attempt's outcome.
        """
        if outcome.rate_limited or outcome.timed_out or outcome.overloaded:
            if outcome.retry_after:
                loop = asyncio.get_running_loop()
                self.pause_until = max(self.pause_until, loop.time() + outcome.retry_after)
            paced = self.rate_known and outcome.rate_limited
            if outcome.started_seq > self._decreased_at_seq and not paced:
                self.limit = max(float(self.minimum), self.limit / 2)
                self._decreased_at_seq = self._seq
                self.decreases += 1
        elif outcome.ok:
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        self._slots.set_capacity(math.floor(self.limit))


class Limits:
    """Several limits acquired in order (released in reverse); a cancelled acquire leaks nothing."""

    def __init__(self, limits: Sequence[Limit]):
        self.limits = list(limits)

    async def acquire(self, cost: Cost) -> None:
        taken: list[Limit] = []
        try:
            for limit in self.limits:
                await limit.acquire(cost)
                taken.append(limit)
        except BaseException:
            for limit in reversed(taken):
                limit.release(cost, None)  # type: ignore[arg-type]
            raise

    def add(self, limit: Limit) -> None:
        """Add a limit learned during the run (e.g. from x-ratelimit-* headers)."""
        self.limits.append(limit)

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        for limit in reversed(self.limits):
            limit.release(cost, outcome)  # type: ignore[arg-type]

    def hold(self, cost: Cost) -> Hold:
        """``async with limits.hold(cost) as h:`` acquire, then release once, with ``h.outcome``."""
        return Hold(self, cost)


class Hold:
    """One cost held on a limit: ``async with`` acquires it and releases it exactly once.

    Set ``outcome`` before the block ends for limits that learn from it. ``release()`` early
    (e.g. before a backoff) and ``reacquire()``; a cancelled reacquire leaves nothing held, so
    no exit path can leak a unit or give one back twice.
    """

    __slots__ = ("cost", "held", "limit", "outcome")

    def __init__(self, limit: Limit | Limits, cost: Cost, *, held: bool = False) -> None:
        self.limit, self.cost, self.held = limit, cost, held
        self.outcome: Outcome | None = None

    async def __aenter__(self) -> Hold:
        if not self.held:
            await self.limit.acquire(self.cost)
            self.held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def reacquire(self) -> None:
        if not self.held:
            await self.limit.acquire(self.cost)
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limit.release(self.cost, self.outcome)  # type: ignore[arg-type]
