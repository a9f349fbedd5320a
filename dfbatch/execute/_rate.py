"""The request / token rate limit: a token bucket that learns how the provider enforces.

Split from ``_limits`` (which holds the protocol, ``Cost`` / ``Outcome`` and the other limits;
the log of what was charged when is ``_journal.ChargeLog``). Units are requests
(``tokens=False``) or tokens (``tokens=True``: a call is charged its estimated tokens up front
and corrected by ``Outcome.actual_tokens`` afterwards).

- **Burst.** The bucket starts holding one second's worth (``start_s``; never more than
  ``burst`` minutes), since many providers enforce a per-minute limit per second. Headers that
  show a bigger bucket (``x-ratelimit-remaining-*``, see ``sync`` / ``observe``) let it grow, up
  to a minute's worth. A call larger than the bucket waits for a full bucket and leaves it in
  debt (never deadlocks). The bucket sits out the run's pause on 429s before it charges
  (``pause``), so the sends a pause held are paced after it, not all sent at its end.
- **AIMD on the rate.** A rate-limit 429 for a call this bucket paced means the provider counts
  differently: the effective ``rate`` drops to ``decrease`` x itself (once per episode: 429s of
  calls sent before the drop are ignored) and the bucket shrinks back to one second's worth;
  clean calls regrow the rate additively, back to the ceiling within ``regrow_s`` seconds.
- **Windows.** Headers that state ``remaining`` but no ``reset`` (a gateway's fixed
  calendar-minute window, LiteLLM style) say nothing of how the provider refills: the bucket
  then also keeps at most ``per_minute`` units in any 60 s (``windowed``), which no per-minute
  enforcement refuses -- a fixed window included.
- **Unknown limit.** ``per_minute=None`` lets everything through until headers state a
  ``x-ratelimit-limit-*`` (adopted) or a 429 arrives. The rate then starts from what the
  provider answered (a lower bound: sends may have been held back by a pause) and, like TCP's
  slow start, doubles per round trip (at least ``start_s``: the window a per-second limit is
  enforced over) while it is what holds the sends back. The next 429 ends the slow start: the
  rate becomes ``decrease`` x the rate its call was sent at, and regrows additively (back to
  the refused rate within ``(1 - decrease) x regrow_s``), with no ceiling.

So in any window of ``T`` seconds at most ``capacity + per_minute * T / 60`` units go out.

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._limits import Cost
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
import bisect
import math
from array import array
from collections import deque

from dfbatch.execute._headers import RateHints
from dfbatch.execute._journal import JOURNAL_S, ChargeLog
from dfbatch.execute._limits import UNSENT, Cost, Outcome
from dfbatch.execute._pause import PauseGate

_NOISE_S = 10.0  # a second 429 within this many seconds is no window-edge noise


class _Bucket:
    """The pacing half of ``RateLimit``: a bucket of ``level`` units (at most ``capacity``)
    refilled at ``rate`` per second, the charge log, the run's pause sat out before a
    charge; FIFO. How ``rate`` and ``capacity`` are learned is ``RateLimit``'s."""

    def __init__(self, tokens: bool) -> None:
        self.tokens = tokens
        self.per_minute = 0.0  # the ceiling (told, or stated by headers); 0 while unknown
        self.rate = math.inf  # effective units per second
        self.capacity = math.inf
        self.level = math.inf
        self.recent_wait = 0.0  # moving average of seconds an acquire waited (is it binding?)
        self.log = ChargeLog()
        self.pause: PauseGate | None = None  # the run's pause on 429s (sat out before a charge)
        self._drained_at = -math.inf  # last charge that left the bucket short of another
        self._stamp: float | None = None
        self._lock = asyncio.Lock()
        self._queued = 0  # acquires waiting or holding the lock (try_acquire never jumps them)

    @property
    def known(self) -> bool:
        return math.isfinite(self.rate)

    @property
    def windowed(self) -> bool:
        return self.log.windowed

    def _units(self, cost: Cost) -> float:
        return float(cost.tokens if self.tokens else cost.requests)

    def _refill(self, now: float) -> None:
        if self._stamp is not None and self.known:
            self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self, cost: Cost) -> bool:
        """Pay ``cost`` now if the bucket holds it, no pause holds sends and nobody waits
        before it (the common case, without a coroutine); else take nothing."""
        if self._queued:
            return False
        now = asyncio.get_running_loop().time()
        units = float(cost.tokens if self.tokens else cost.requests)
        pause = self.pause
        if self.rate == _INF and not self.log.windowed and (pause is None or pause.until <= now):
            self._stamp = now  # an unknown limit only logs the charge (one per call)
            self.log.add(now, units, _UNKNOWN_LOG_S, _MERGE_S)
            if self.recent_wait:
                self.recent_wait -= 0.1 * self.recent_wait
            return True
        self._refill(now)
        if (self.known and self.level < min(units, self.capacity)) \
                or self._window_wait(now, units) > 0:
            return False
        self.level -= units
        self._journal(now, units)
        self.recent_wait -= 0.1 * self.recent_wait
        return True

    async def acquire(self, cost: Cost) -> None:
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            if self.pause is not None:  # (not counted in recent_wait: the rate does not bind)
                await self.pause.wait()
            t0 = loop.time()
            async with self._lock:  # FIFO: the head waits for the refill, the rest queue behind
                self._refill(loop.time())
                while True:
                    need = min(self._units(cost), self.capacity)
                    wait = (need - self.level) / self.rate if self.level < need else 0.0
                    wait = max(wait, self._window_wait(loop.time(), self._units(cost)))
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                    self._refill(loop.time())
                self.level -= self._units(cost)
                self._journal(loop.time(), self._units(cost))
        finally:
            self._queued -= 1
        self.recent_wait += 0.1 * ((loop.time() - t0) - self.recent_wait)

    def _window_wait(self, now: float, units: float) -> float:
        """Seconds until ``units`` more may go: the windowed log's, and the run's pause (so
        sends held by a pause are charged, and paced, after it; not all sent at its end)."""
        held = self.pause.until - now if self.pause is not None else 0.0
        return max(held, self.log.window_wait(now, units, self.per_minute))

    def _journal(self, now: float, units: float) -> None:
        """Log a charge just paid (for ``sync`` and 429 episodes); note when it drained us."""
        # an unknown limit reads 10 s back (the rate a 429 guesses from): a fast run keeps no
        # two-minute log of its charges (memory) until a limit is known
        if self.known or self.log.windowed:
            self.log.add(now, units, JOURNAL_S)
        else:
            self.log.add(now, units, _UNKNOWN_LOG_S, _MERGE_S)
        if self.level < units:
            self._drained_at = now


class RateLimit(_Bucket):
    """A token bucket refilled at an effective rate that learns how the provider enforces
    (see the module docstring)."""

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
        super().__init__(tokens)
        self.burst = burst
        self.start_s = start_s
        self.decrease = decrease
        self.regrow_s = regrow_s
        self.server_capacity = 0.0  # learned from x-ratelimit-remaining-*: provider bucket size
        self.decreases = 0
        self.slow_start = False  # a guessed rate that doubles per round trip (unknown limit)
        self._guess = _Guess()
        self._slope = 0.0  # regrowth, units/s per second
        self._decreased_at = -math.inf
        self._grown_at = 0.0
        self._noise_at = -math.inf  # the last 429 taken for a window edge (no decrease)
        if per_minute is not None:
            self.set_ceiling(per_minute)

    @property
    def _stated_window(self) -> bool:
        """Headers stated the fixed window (and its quota) the limit counts in."""
        return self.log.quota is not None

    @property
    def largest(self) -> float:
        """The most units one call can ever be charged (0: no limit known): a minute's limit,
        or a stated window's quota."""
        quota = self.log.quota
        if quota is not None and self.per_minute:
            return min(quota, self.per_minute)
        return quota or self.per_minute

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

    def sync(self, remaining: float, cost: Cost, *, lower_only: bool = False) -> None:
        """The provider said its bucket held ``remaining`` right after admitting this task's call.

        Learn the provider's bucket size (at least ``remaining`` + this call) and set our level
        to the provider's level now, by replaying the charges we sent after that call. So a
        provider with a full-minute bucket gets used from the start, and one that enforces
        its limit per second (small bucket) is not overrun. After a rate-limit 429 the
        headers are not trusted to grow the bucket for ``regrow_s`` seconds.
        """
        mine = self.log.mine()
        if mine is None or not self.known:
            return
        now = asyncio.get_running_loop().time()
        if not lower_only:
            self.server_capacity = max(self.server_capacity, remaining + self._units(cost))
            trusted = now >= self._decreased_at + self.regrow_s
            bucket = min(self.per_minute or math.inf, self.server_capacity)
            self.capacity = max(1.0, bucket if trusted else min(bucket, self._small_bucket()))
        level, t = remaining, mine[0]
        for ts, units in self.log.after_mine():
            level = min(self.capacity, level + (ts - t) * self.rate) - units
            t = ts
        self._refill(now)
        level = min(self.capacity, level + (now - t) * self.rate)
        if self._stated_window:  # (replayed sends the provider refused were not its debt past
            level = max(0.0, level)  # the window's end; the window log keeps the count)
        self.level = min(self.level, level) if lower_only else level

    def observe(self, hints: RateHints, cost: Cost) -> None:
        """Learn from one answer's headers: adopt the stated limit, sync to ``remaining``."""
        limit = hints.limit(self.tokens)
        if limit is not None and limit > 0:
            self.set_ceiling(limit)
        remaining = hints.remaining(self.tokens)
        window = hints.window(self.tokens)
        if window is not None:  # a policy counted in fixed windows: keep any such window in it
            quota = limit * window / 60.0 if limit is not None else None
            self.log.open_window(asyncio.get_running_loop().time(), window, quota)
        elif remaining is not None and hints.reset(self.tokens) is None:
            # no reset stated: keep any minute within the limit
            self.log.open_window(asyncio.get_running_loop().time())
        if remaining is not None:
            # told a lower limit than the provider's: its bucket says nothing about ours,
            # except that it may be emptier (shared with other clients)
            ours = bool(self.per_minute) and limit is not None and limit > self.per_minute
            self.sync(remaining, cost, lower_only=ours)

    def on_rate_limited(self, hints: RateHints | None = None) -> bool:
        """A rate-limit 429 came back for this task's call: lower the effective rate, once per
        episode (skipped when the headers show the *other* limit ran out). Returns whether
        the rate was lowered."""
        mine = self.log.mine()
        if mine is None or mine[0] < self._decreased_at:
            return False
        if hints is not None and _other_ran_out(hints, self.tokens):
            return False
        now = asyncio.get_running_loop().time()
        if self._stated_window and self.known:
            if mine[0] <= self._noise_at:  # sent before the edge's first 429 came back: the
                return False  # same edge (the calls a window released, met a few ms early)
            if now - self._noise_at > _NOISE_S:
                # paced by the provider's own stated window: a lone 429 is a window edge met a
                # few ms early (or another client's send), not a slower provider; the run's
                # pause waits it out, and the window kept grows a margin. Another one within
                # _NOISE_S (of a call sent after this one came back) lowers the rate.
                self._noise_at = now
                self.log.widen(now)
                return False
        if not self.known:  # start from what the provider let through while it refused the rest
            admitted = self._guess.admitted_rate(now, self.log.first_at)
            if admitted <= 0:
                return False
            self.rate, self.slow_start, self._slope = admitted, True, admitted / self.regrow_s
            self._guess.start(now, admitted)
        elif self.slow_start:  # found: below the rate the refused call was sent at
            sent = min(self.rate, self._guess.rate_at(mine[0], self.rate))
            self.rate = max(self._floor(), sent * self.decrease)
            self.slow_start, self._slope = False, sent / self.regrow_s
        else:
            if not self.per_minute:  # a guess: regrow toward the rate refused now
                self._slope = self.rate / self.regrow_s
            self.rate = max(self._floor(), self.rate * self.decrease)
        return self._shrink(now, self._small_bucket())

    def _shrink(self, now: float, capacity: float) -> bool:
        """A decrease: the bucket holds ``capacity`` from now; a new episode begins."""
        self.capacity = max(1.0, min(self.capacity, capacity, self._small_bucket()))
        self._refill(now)
        self.level = min(self.level, self.capacity)
        self._decreased_at = self._grown_at = now
        self.decreases += 1
        return True

    def _floor(self) -> float:
        return (self.per_minute / 60.0 / 20.0) if self.per_minute else 1e-3

    def _regrow(self, units: float) -> None:
        """A clean answer: in slow start the rate doubles per round trip (at least ``start_s``)
        of time it paced the sends; otherwise it regrows by ``_slope`` per second, up to the
        ceiling."""
        now = asyncio.get_running_loop().time()
        ceiling = self.per_minute / 60.0 if self.per_minute else math.inf
        mine = self.log.mine() if self.slow_start else None
        if mine is not None and self._drained_at >= mine[0]:
            held = self.pause.until if self.pause is not None else -math.inf
            paced_s = max(0.0, now - max(self._grown_at, held))  # (a pause tries no rate)
            grown = self.rate * 2.0 ** (paced_s / max(self.start_s, now - mine[0]))
            self.rate = min(ceiling, grown)
            self._guess.grew(now, self.rate)
        elif self.known and self.rate < ceiling and not self.slow_start:
            self.rate = min(ceiling, self.rate + self._slope * max(0.0, now - self._grown_at))
        self._grown_at = now

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        if outcome is None:
            return
        if self.rate == _INF and outcome.ok and not outcome.rate_limited \
                and outcome.hints is None:  # (the common case of an unknown limit, below)
            now = asyncio.get_running_loop().time()
            self._grown_at = now
            self._guess.answered(now, float(cost.tokens if self.tokens else cost.requests))
            return
        if outcome is UNSENT:  # taken by an all-or-none try that failed: nothing went out
            if self.known:
                self.level = min(self.capacity, self.level + self._units(cost))
            return
        if self.tokens and outcome.actual_tokens is not None and self.known:
            # refund (or charge) the difference between the estimate and the real usage
            self.level = min(self.capacity, self.level + cost.tokens - outcome.actual_tokens)
        if outcome.rate_limited:
            self.on_rate_limited(outcome.hints)
        elif outcome.ok and not self.known and not self.slow_start:
            now = asyncio.get_running_loop().time()  # (nothing to regrow: no rate yet)
            self._grown_at = now
            self._guess.answered(now, self._units(cost))  # what a guess of the rate starts from
        elif outcome.ok:
            self._regrow(self._units(cost))
            if not self.known:  # (what a guess of the rate starts from)
                self._guess.answered(asyncio.get_running_loop().time(), self._units(cost))
        if outcome.hints is not None:
            self.observe(outcome.hints, cost)


_UNKNOWN_LOG_S = 15.0  # an unknown limit reads its charges 10 s back (a 429's guess)
_MERGE_S = 0.01  # ... so it logs them per 10 ms (a fast run's logs stay small: peak RSS)
_INF = math.inf  # the rate of an unknown limit


class _Guess:
    """What an unknown limit is guessed from: the units answered lately, and the rates its slow
    start went through (so a 429 is set against the rate its call was sent at)."""

    def __init__(self) -> None:
        # (time, units) answered from index _head on: two arrays, 16 bytes an answer
        self._times, self._units, self._head = array("d"), array("d"), 0
        self._rates: deque[tuple[float, float]] = deque(maxlen=64)  # (since, rate)

    def answered(self, now: float, units: float) -> None:
        times = self._times
        if len(times) > self._head and now - times[-1] < _MERGE_S:
            self._units[-1] += units  # (answers within 10 ms are one entry: see _MERGE_S)
            return
        times.append(now)
        self._units.append(units)
        if self._times[self._head] < now - _UNKNOWN_LOG_S:  # bounded: 10 s are read
            self._head += 1
            if self._head >= 4096 and 2 * self._head >= len(self._times):
                self._drop()

    def _drop(self) -> None:
        """Forget the answers before ``_head`` (at most as many as are kept: amortized)."""
        del self._times[:self._head]
        del self._units[:self._head]
        self._head = 0

    def admitted_rate(self, now: float, first_at: float | None, window: float = 10.0) -> float:
        """Units per second answered (not refused) over the last ``window`` seconds; 0 while
        the first charge (at ``first_at``) is under a second old."""
        self._head = max(self._head, bisect.bisect_left(self._times, now - window))
        self._drop()
        if first_at is None or now - first_at < 1.0 or not self._times:
            return 0.0
        span = max(1.0, now - self._times[0])
        return sum(self._units) / span

    def start(self, now: float, rate: float) -> None:
        self._rates.clear()
        self._rates.append((now, rate))

    def grew(self, now: float, rate: float) -> None:
        self._rates.append((now, rate))

    def rate_at(self, t: float, default: float) -> float:
        """The rate a call charged at ``t`` was paced at (``default`` before any)."""
        return next((rate for since, rate in reversed(self._rates) if since <= t), default)


def _other_ran_out(hints: RateHints, tokens: bool) -> bool:
    """Do the headers show the *other* limit (requests vs tokens) ran out, not this one?"""
    mine, other = hints.remaining(tokens), hints.remaining(not tokens)
    return other is not None and other < 1 and mine is not None and mine >= 1
