"""Global RPM / TPM for many processes: one token bucket that leases units to clients in chunks.

The Ray engine runs one ``Limiter`` actor per run. Each agent actor spends units through a
``LeasedRates`` (the pool's ``Limit`` protocol): it asks the limiter for what the call at the
head of its queue needs plus a small prefetch, then spends the prefetch locally with no round
trip. A lease expires after ``ttl`` seconds; an actor gives back what it did not spend when it
leases again, and a dead actor's lease simply expires.

Leases never add burst: the ``Bucket`` counts leased, unspent units as taken (its level refills
only up to ``capacity - outstanding``), so the units spent in any window of ``T`` seconds stay
within ``capacity + rate * T``, the same bound as the asyncio pool's ``RateLimit``, however
many clients lease. Clients never need synchronized clocks: a client treats its lease as
expired ``ttl`` seconds after it *sent* the request (plus the time the limiter reports it
waited), which is never later than the limiter's own expiry.

Examples
--------
>>> b = Bucket(600, burst=0.1)  # 10 units/s, 60 at once
>>> b.grant("a", 1, extra=10, now=0.0, ttl=2.0)  # one unit for the call, ten prefetched
11.0
>>> b.wait(45, now=0.0)  # 49 left
0.0
>>> b.wait(55, now=0.0)  # the level stays under 60 - 11 leased until "a" gives back or expires
2.0
>>> b.give_back("a", 4, now=0.5)  # "a" leases again: it spent 7 of its 11 units
>>> b.level
53.0
>>> b.grant("b", 1, extra=5, now=0.5, ttl=2.0), b.outstanding
(6.0, 6.0)
>>> b.wait(50, now=0.5)  # 47 left, 3 more take 0.3 s
0.3
>>> b.wait(50, now=0.5, extra=2)  # a request that must wait anyway waits for a chunk
0.5
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from dfbatch.execute._limits import Cost, Outcome


@dataclass
class Bucket:
    """A token bucket (``per_minute``, holding ``burst`` minutes) that leases units to clients.

    Pure bookkeeping with explicit ``now`` (monotonic seconds); the ``Limiter`` owns the clock.
    """

    per_minute: float
    burst: float = 0.1
    rate: float = field(init=False)
    capacity: float = field(init=False)
    level: float = field(init=False)
    outstanding: float = 0.0  # leased units whose lease has not expired or come back
    stamp: float | None = None
    _leases: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    _expiry: list[tuple[float, int, str]] = field(default_factory=list)  # heap, lazy deletes
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.rate = self.per_minute / 60.0
        self.capacity = max(1.0, self.per_minute * self.burst)
        self.level = self.capacity

    def give_back(self, client: str, units: float, now: float) -> None:
        """End ``client``'s lease; ``units`` it did not spend return to the bucket."""
        self._refill(now)
        held = self._leases.pop(client, None)
        if held is None:
            return
        self.outstanding -= held[0]
        if held[1] > now:
            self.level += max(0.0, min(units, held[0]))

    def correct(self, units: float, now: float) -> None:
        """Refund (``units > 0``) or charge (``< 0``) the error of a token estimate."""
        self._refill(now)
        self.level = min(self.capacity - self.outstanding, self.level + units)

    def wait(self, need: float, now: float, extra: float = 0.0) -> float:
        """Seconds until ``need`` units can be granted (0: now); above capacity: a full bucket.

        A request that has to wait anyway waits for ``extra`` spare units too (when the bucket
        has room for them): while the rate binds, each lease then serves several calls.
        """
        self._refill(now)
        need = min(need, self.capacity)
        if self.level >= need:
            return 0.0
        room = self.capacity - self.outstanding
        if room >= need:
            return (max(need, min(need + extra, room)) - self.level) / self.rate
        t_rate = (need - self.level) / self.rate
        for units, expires, _ in sorted(self._leases.values(), key=lambda x: x[1]):
            room += units  # the level may reach ``need`` only once enough leases expire
            if room >= need:
                return max(t_rate, expires - now)
        return t_rate  # pragma: no cover - every lease expires eventually

    def grant(self, client: str, need: float, extra: float, now: float, ttl: float) -> float:
        """Lease ``need`` units plus up to ``extra`` spare ones (call after ``wait`` is 0)."""
        self._refill(now)
        units = float(need) + max(0.0, min(extra, self.level - need))
        self.level -= units  # a need above capacity leaves the bucket in debt, as RateLimit does
        self.give_back(client, 0.0, now)
        serial = next(self._serial)
        self._leases[client] = (units, now + ttl, serial)
        heapq.heappush(self._expiry, (now + ttl, serial, client))
        self.outstanding += units
        return units

    def _refill(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, serial, client = heapq.heappop(self._expiry)
            held = self._leases.get(client)
            if held is not None and held[2] == serial:
                del self._leases[client]
                self.outstanding -= held[0]
        if self.stamp is not None and now > self.stamp:
            self.level += (now - self.stamp) * self.rate
        self.stamp = now if self.stamp is None else max(self.stamp, now)
        self.level = min(self.level, self.capacity - self.outstanding)


class Limiter:
    """The run's global request and token buckets (a Ray async actor in the Ray engine).

    ``lease`` waits, FIFO across all clients, until both buckets can grant the head request:
    for the refill it computed, or less when a client gives units back in the meantime.
    """

    def __init__(self, rpm: float | None, tpm: float | None, burst: float, ttl: float) -> None:
        self.buckets = (Bucket(rpm, burst) if rpm else None, Bucket(tpm, burst) if tpm else None)
        self.ttl = ttl
        self.leases = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # units came back: the head's wait may be shorter

    async def lease(
        self,
        client: str,
        need: tuple[float, float],
        extra: tuple[float, float],
        back: tuple[float, float],
        correction: float,
    ) -> tuple[tuple[float, float], float]:
        """Grant ``need`` (+ up to ``extra``) requests and tokens; returns (granted, waited_s)."""
        loop = asyncio.get_running_loop()
        t_in = loop.time()
        rows = zip(self.buckets, need, extra, back, strict=True)
        live = [(b, n, x, r) for b, n, x, r in rows if b]
        for bucket, _, _, unspent in live:
            bucket.give_back(client, unspent, t_in)
        if self.buckets[1] is not None and correction:
            self.buckets[1].correct(correction, t_in)
        self._changed.set()
        async with self._lock:
            wait = max((b.wait(n, loop.time(), x) for b, n, x, _ in live), default=0.0)
            while wait > 0:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
                wait = max(b.wait(n, loop.time(), x) for b, n, x, _ in live)
            now = loop.time()
            granted = [
                b.grant(client, n, x, now, self.ttl) if b else 0.0
                for b, n, x in zip(self.buckets, need, extra, strict=True)
            ]
        self.leases += 1
        return (granted[0], granted[1]), now - t_in

    def stats(self) -> dict[str, Any]:
        """Leases granted and each bucket's level (for tests and the curious)."""
        return {
            "leases": self.leases,
            "levels": [b.level if b else None for b in self.buckets],
        }


class LeasedRates:
    """The RPM / TPM ``Limit`` of one actor: spends units leased in chunks from a ``Limiter``.

    ``limiter`` is anything with an awaitable ``lease`` (a Ray actor handle's
    ``limiter.lease.remote``, or a local ``Limiter.lease`` in tests). One lease request at a
    time per client (FIFO): the head call leases what it needs plus ``extra``; the calls queued
    behind it spend the extra with no round trip.
    """

    def __init__(
        self,
        lease: Any,
        client: str,
        *,
        requests: bool,
        tokens: bool,
        extra: tuple[float, float],
        ttl: float,
    ) -> None:
        self._lease_call = lease
        self.client = client
        self.requests = requests
        self.tokens = tokens
        self.extra = extra
        self.ttl = ttl
        self.leases = 0
        self._balance = [0.0, 0.0]
        self._expires = 0.0
        self._correction = 0.0
        self._lock = asyncio.Lock()

    def try_acquire(self, cost: Cost) -> bool:
        """Spend from the lease in hand when it covers ``cost`` (no lease call, no wait)."""
        need_r = float(cost.requests) if self.requests else 0.0
        need_t = float(cost.tokens) if self.tokens else 0.0
        if self._lock.locked() or asyncio.get_running_loop().time() >= self._expires \
                or self._balance[0] < need_r or self._balance[1] < need_t:
            return False
        self._balance[0] -= need_r
        self._balance[1] -= need_t
        return True

    async def acquire(self, cost: Cost) -> None:
        need = (
            float(cost.requests) if self.requests else 0.0,
            float(cost.tokens) if self.tokens else 0.0,
        )
        loop = asyncio.get_running_loop()
        async with self._lock:
            if loop.time() >= self._expires:
                self._balance = [0.0, 0.0]
            if self._balance[0] < need[0] or self._balance[1] < need[1]:
                await self._lease(need, loop)
            self._balance[0] -= need[0]
            self._balance[1] -= need[1]

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        if self.tokens and outcome is not None and outcome.actual_tokens is not None:
            self._correction += cost.tokens - outcome.actual_tokens  # reported with next lease

    async def _lease(self, need: tuple[float, float], loop: asyncio.AbstractEventLoop) -> None:
        sent = loop.time()
        back = (self._balance[0], self._balance[1]) if sent < self._expires else (0.0, 0.0)
        self._balance, self._expires = [0.0, 0.0], 0.0
        correction, self._correction = self._correction, 0.0
        granted, waited = await self._lease_call(self.client, need, self.extra, back, correction)
        self.leases += 1
        self._balance = [granted[0], granted[1]]
        self._expires = sent + waited + self.ttl  # never later than the limiter's expiry


def lease_ttl(burst: float, longest: float = 2.0) -> float:
    """Seconds a lease lives: at most ``longest``, and a third of the bucket's burst window.

    A spent lease keeps counting as taken until its client leases again or it expires; with a
    TTL of a third of the window, expiries alone free the bucket three times faster than the
    rate refills it, so idle clients never hold the rate down.

    >>> lease_ttl(0.1), lease_ttl(0.01)  # 6 s and 0.6 s of burst
    (2.0, 0.2)
    """
    return min(longest, burst * 20.0)  # a third of burst * 60 s


def chunk(per_minute: float | None, burst: float, n_clients: int, ttl: float) -> float:
    """Spare units a client prefetches: its share of what refills in ``ttl / 2``.

    Capped so that all clients together hold at most half the bucket: an idle client's lease
    can then never keep the others waiting for its expiry.

    >>> chunk(1200, 0.1, 4, 2.0), chunk(1200, 0.001, 4, 2.0), chunk(None, 0.1, 4, 2.0)
    (5.0, 0.15, 0.0)
    """
    if not per_minute:
        return 0.0
    capacity = max(1.0, per_minute * burst)
    return min(per_minute / 60.0 * ttl / 2, capacity / 2) / max(1, n_clients)
