"""A global pause: when the provider says "slow down", no call of the run is sent until then.

A 429 with a hint (``retry-after`` in any spelling) pauses every send until the hinted time;
a pause longer than the breaker's ``give_up_s`` (``outage_timeout``) stops the run that long
after it began, while it still holds every send.
A 429 with no hint pauses for a growing floor (1 s, 2 s, 4 s … up to a minute): once per
episode (429s of calls sent before the pause began do not grow it), and only while no call
succeeds (a provider that answers some calls counts a rate; the buckets slow down instead of
the pause growing); reset by a success of a call sent after the pause. It is a limit like the
others (``acquire`` / ``release``); put it last in a stack, so a call that waited for a bucket
still sits out a pause that began meanwhile. The rate buckets sit it out too, before they
charge (``RateLimit.pause``): the sends held by a pause are paced after it, not all sent at
its end (a burst that a per-second limit refuses).

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._limits import Cost, Outcome
>>> from dfbatch.execute._pause import PauseGate
>>> async def demo():
...     gate, loop = PauseGate(), asyncio.get_running_loop()
...     await gate.acquire(Cost())
...     gate.release(Cost(), Outcome(ok=False, rate_limited=True, retry_after=0.2))
...     t0 = loop.time(); await gate.acquire(Cost())
...     return round(loop.time() - t0, 1)
>>> asyncio.run(demo())
0.2
"""

from __future__ import annotations

import asyncio
import contextvars
import math

from dfbatch.errors import NoProgressError
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._limits import Cost, Outcome


class PauseGate:
    """Every send waits while the run is paused (see the module docstring)."""

    def __init__(self, *, first_s: float = 1.0, max_s: float = 60.0,
                 breaker: Breaker | None = None) -> None:
        self.first_s = first_s
        self.breaker = breaker  # told of every 429 (it stops a run that makes no progress)
        self.max_s = max_s
        self.until = 0.0
        self.floor = 0.0  # the last unhinted pause (0: none since the last success)
        self.pauses = 0
        self._answered = False  # a call succeeded since the floor last grew
        self._paused_at = -math.inf
        self._deadline: asyncio.TimerHandle | None = None  # stops a pause past outage_timeout
        self._sent: contextvars.ContextVar[float] = contextvars.ContextVar("sent", default=-1.0)

    def try_acquire(self, cost: Cost | None = None) -> bool:
        now = asyncio.get_running_loop().time()
        if self.until > now:
            return False
        self._sent.set(now)
        return True

    async def acquire(self, cost: Cost | None = None) -> None:
        await self.wait()
        self._sent.set(asyncio.get_running_loop().time())

    async def wait(self) -> None:
        """Wait while the run is paused (takes nothing, records nothing). Raises the
        breaker's run-stopping error at once when it stops (a stopped run does not sit out a
        pause: a Retry-After may be an hour)."""
        loop = asyncio.get_running_loop()
        nap = asyncio.sleep if self.breaker is None else self.breaker.sleep
        # a timed wait, re-checked because a later 429 may extend the pause
        while (wait := self.until - loop.time()) > 0:
            await nap(wait)

    def release(self, cost: Cost | None = None, outcome: Outcome | None = None) -> None:
        if outcome is None:
            return
        if outcome.rate_limited:
            self.on_rate_limited(outcome.retry_after)
            if self.breaker is not None:
                self.breaker.stalled("rate_limit")
        elif outcome.ok:
            self._answered = True
            if self.floor and self._sent.get() >= self._paused_at:
                self.floor = 0.0

    def on_rate_limited(self, retry_after: float | None = None) -> float:
        """This task's call got a rate-limit 429: pause every send. Returns the pause's end."""
        if retry_after is not None and retry_after > 0:
            self.pause(retry_after)
        elif self._sent.get() >= self._paused_at:
            # the provider still answers some calls: a rate it counts (the buckets slow
            # down), not a closed window; only when nothing got through does the floor grow
            grow = self.floor and not self._answered
            self.floor = min(self.max_s, 2 * self.floor) if grow else self.first_s
            self._answered = False
            self.pause(self.floor)
        return self.until

    def pause(self, seconds: float) -> None:
        """Hold every send for ``seconds`` from now (never shortens a pause)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now + seconds > self.until:
            self.until = now + seconds
            self._paused_at = now
            self.pauses += 1
            give_up = self.breaker.give_up_s if self.breaker is not None else None
            if give_up is not None and seconds > give_up and self._deadline is None:
                self._deadline = loop.call_later(give_up, self._held_too_long, seconds)

    def _held_too_long(self, seconds: float) -> None:
        """``outage_timeout`` after a pause longer than it began (a daily limit's
        ``retry-after``): no request has gone out since, so the run stops (resumable). The
        breaker's stall clock alone would not: answers of calls sent before the pause disarm
        it, and nothing fails again while every send waits."""
        self._deadline = None
        breaker = self.breaker
        if breaker is None or breaker.stopped is not None or breaker.give_up_s is None \
                or self.until <= asyncio.get_running_loop().time():
            return
        msg = (f"a rate-limit 429 asked to wait {seconds:.0f} s before sending again (its "
               f"retry-after): no request was sent for outage_timeout={breaker.give_up_s:g} s")
        breaker.stop(NoProgressError(msg, cause="retry_after"))

    def close(self) -> None:
        """The run is over: cancel the timer of a long pause (it must not fire after it)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    @property
    def paused(self) -> bool:
        return self.until > asyncio.get_running_loop().time()
