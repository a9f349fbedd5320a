"""Composable limits: concurrency, bytes in flight, request rate, token rate, adaptive (AIMD).

Every limit has the same two-step protocol (aiometer's meters): ``await acquire(cost)`` before a
call starts, ``release(cost, outcome)`` when it ends. The pool stacks them; none of them knows
about the others, and none of them polls: waiters sleep on a future or for the exact time a
bucket needs to refill.

The request / token rate limit (``RateLimit``) is in ``_rate``.

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._limits import CapacityLimit, Cost
>>> async def demo():
...     slots = CapacityLimit(2)
...     await slots.acquire(Cost()); await slots.acquire(Cost())
...     third = asyncio.ensure_future(slots.acquire(Cost()))
...     await asyncio.sleep(0); waiting = not third.done()
...     slots.release(Cost()); await third
...     return waiting
>>> asyncio.run(demo())  # the third call waits for a slot
True
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dfbatch.execute._headers import RateHints


@dataclass(slots=True)  # (not frozen: a frozen init costs ~1 us a field, at every call)
class Cost:
    """What one call will use: a request, its estimated tokens, its bytes in memory."""

    tokens: int = 0
    nbytes: int = 0
    requests: int = 1


@dataclass(slots=True)
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


UNSENT = Outcome(ok=False)  # released without a call: taken, then given back unused


class Limit(Protocol):
    async def acquire(self, cost: Cost) -> None: ...

    def try_acquire(self, cost: Cost) -> bool:
        """Take ``cost`` now if that needs no wait and jumps no queue; else take nothing."""
        ...

    def release(self, cost: Cost, outcome: Outcome | None) -> None: ...




class CapacityLimit:
    """At most ``capacity`` units in use, where a call's units are ``weight(cost)``.

    ``weight`` defaults to 1 per call (a concurrency limit). A call heavier than the whole
    capacity still runs, alone, so nothing can wait forever (bytes limit). FIFO fair.
    """

    def __init__(self, capacity: float, weight: Callable[[Cost], float] | None = None):
        self.capacity = float(capacity)
        self.in_use = 0.0
        self.max_in_use = 0.0
        self._weight = weight or _one
        self._counts = weight is None  # (a concurrency limit: 1 a call, no weight to call)
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()

    def _fits(self, w: float) -> bool:
        return self.in_use + w <= self.capacity or self.in_use == 0

    def try_acquire(self, cost: Cost) -> bool:
        w = 1.0 if self._counts else self._weight(cost)
        in_use = self.in_use
        if not self._waiters and (in_use + w <= self.capacity or in_use == 0):
            in_use += w
            self.in_use = in_use
            if in_use > self.max_in_use:
                self.max_in_use = in_use
            return True
        return False

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
        in_use = self.in_use - (1.0 if self._counts else self._weight(cost))
        self.in_use = in_use if in_use > 0.0 else 0.0
        if self._waiters:
            self._wake()

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

    def try_acquire(self, cost: Cost) -> bool:
        if self.pause_until and self.pause_until > asyncio.get_running_loop().time():
            return False
        slots = self._slots  # (its try_acquire, inlined: one unit a call)
        in_use = slots.in_use
        if slots._waiters or (in_use + 1.0 > slots.capacity and in_use != 0):
            return False
        in_use += 1.0
        slots.in_use = in_use
        if in_use > slots.max_in_use:
            slots.max_in_use = in_use
        self._seq += 1
        return True

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
        if outcome is not None and (self.limit < self.maximum or not outcome.ok
                                    or outcome.rate_limited or outcome.timed_out
                                    or outcome.overloaded):
            self.observe(outcome)  # (not for a clean answer at the maximum: nothing to learn)

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
            if self.limit >= self.maximum:
                return  # (the common case: nothing to grow)
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if math.floor(self.limit) != self._slots.capacity:
            self._slots.set_capacity(math.floor(self.limit))


class Limits:
    """Several limits acquired in order (released in reverse); a cancelled acquire leaks nothing.

    ``limits`` is replaced, never changed in place (``add``, ``drop``): an acquire that waits
    goes on over the list it started with.
    """

    def __init__(self, limits: Sequence[Limit]):
        self._index(list(limits))

    def _index(self, limits: list[Limit]) -> None:
        self.limits = limits
        self._tries = [_try(limit) for limit in limits]
        self._releases = [limit.release for limit in reversed(limits)]

    def try_acquire(self, cost: Cost) -> bool:
        """Every limit at once, or none (the common case costs no coroutine per limit)."""
        limits, tries = self.limits, self._tries
        for try_acquire in tries:
            if not try_acquire(cost):
                break
        else:
            return True
        for limit in reversed(limits[:tries.index(try_acquire)]):
            limit.release(cost, UNSENT)  # (a rate bucket refunds what it took)
        return False

    async def acquire(self, cost: Cost) -> None:
        taken: list[Limit] = []
        try:
            for limit, try_acquire in zip(self.limits, self._tries, strict=True):
                # a limit that can pay at once is taken without a coroutine; the others wait
                if not try_acquire(cost):
                    await limit.acquire(cost)
                taken.append(limit)
        except BaseException:
            for limit in reversed(taken):
                limit.release(cost, None)
            raise

    def add(self, limit: Limit) -> None:
        """Add a limit learned during the run (e.g. from x-ratelimit-* headers)."""
        self._index([*self.limits, limit])

    def drop(self, limit: Limit) -> None:
        """Leave out a limit that holds nothing any more (a warm-up once warm): later
        acquires skip it, and releases of what was taken before skip it too."""
        self._index([lim for lim in self.limits if lim is not limit])

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        for release in self._releases:
            release(cost, outcome)  # type: ignore[arg-type]

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
            if not self.limit.try_acquire(self.cost):
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


def _one(cost: Cost) -> float:
    return 1.0


def _try(limit: Limit) -> Callable[[Cost], bool]:
    """``limit.try_acquire``; always False for a limit that can only wait (``acquire``)."""
    try_acquire: Callable[[Cost], bool] | None = getattr(limit, "try_acquire", None)
    return try_acquire if try_acquire is not None else _never


def _never(cost: Cost) -> bool:
    return False
