"""A circuit breaker: when the service is down, stop sending and probe with one call at a time.

Closed (normal) until recent calls say the service is down: ``threshold`` outage failures in a
row (connection errors, timeouts, 5xx; see ``Decision.outage``), or at least ``ratio`` of the
calls of the last ``window_s`` seconds (with ``min_calls`` or more). Then open: every send
waits, and exactly one probe goes through after ``first_s`` (1 s), then at doubling intervals
up to ``max_s`` (10 s: a dead service sees one request in 10 s, and a run sees the service
back within 10 s), until one succeeds (or gets any answer that is not an outage, e.g. a 400 or a
429: the service is up); then the breaker closes and every waiter goes. A success of a call
sent *before* the breaker opened does not close it.

It also watches for a run that makes no progress: when no call has been answered for
``give_up_s`` seconds while calls keep failing with outages (or rate-limit 429s, reported by
the pause with ``stalled``), it ``stop``s with a ``NoProgressError``: a dead server or a
provider that refuses every call ends the run instead of being probed for ever. A timer armed
when the stall begins stops it on time, whatever sleeps are in progress (a long Retry-After);
``sleep`` (the pause, a retry's backoff) and the probe wait end at once when it stops, and
``listen`` tells the pool, which stops the run then. ``observer`` (the Ray engine's actors) is
told of every answer (``"ok"``) and every stalled call (its cause).

Two ways to use it: ``async with breaker.admit(): ...`` (records the outcome itself, from the
exception if any), or ``ticket = await breaker.wait()`` then ``breaker.record(ticket, health)``
with ``health`` one of ``"ok"``, ``"outage"``, ``"other"``. ``clock`` and ``sleep`` can be
injected (tests use a virtual clock).

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._breaker import Breaker
>>> async def demo():
...     breaker = Breaker(threshold=2, first_s=0.05)
...     for _ in range(2):
...         breaker.record(await breaker.wait(), "outage")
...     closed_before = breaker.closed
...     probe = await breaker.wait()          # after 0.05 s: the one probe
...     breaker.record(probe, "ok")
...     return closed_before, probe.probe, breaker.closed
>>> asyncio.run(demo())
(False, True, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from dfbatch.errors import NoProgressError
from dfbatch.execute._retry import classify

Health = Literal["ok", "outage", "other"]


@dataclass(slots=True)
class Ticket:
    """A pass through the breaker: ``probe`` when it is the one call of an open breaker."""

    probe: bool
    epoch: int


class Breaker:
    """Pause every send while the service is down; probe with one call (module docstring)."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        window_s: float = 10.0,
        min_calls: int = 10,
        ratio: float = 0.5,
        first_s: float = 1.0,
        max_s: float = 10.0,
        give_up_s: float | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        observer: Callable[[str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.min_calls = min_calls
        self.ratio = ratio
        self.first_s = first_s
        self.max_s = max_s
        self.give_up_s = give_up_s
        self._stalled_since: float | None = None  # first failure since the last answer
        self._cause = "outage"  # what the last stalled call failed with
        self._give_up: asyncio.TimerHandle | None = None  # stops the run at the stall's end
        self.observer = observer
        self.last_ok = -math.inf  # when a call was last answered
        self._clock = clock
        self._sleep = sleep  # (None: the loop's clock, a nap that ``stop`` ends)
        self._naps: set[asyncio.Future[None]] = set()
        self._listeners: list[Callable[[BaseException], None]] = []
        self._waits: dict[asyncio.Task[object], list[bool]] = {}  # see ``ends_waits``
        self.closed = True
        self.opens = 0
        self.probes = 0
        self.epoch = 0
        self.interval = first_s
        self.next_probe = 0.0
        self._probing = False
        self._timer = False
        self._in_a_row = 0
        # recent calls counted per tenth of the window: [start, calls, outages] (a log of every
        # call of the last window_s would cost memory and time at thousands of calls a second)
        self._recent: deque[list[float]] = deque()
        self._bin_s = window_s / 10
        self._ticket = Ticket(False, 0)  # the pass of every call while closed (this epoch)
        self._changed: asyncio.Event | None = None
        self.stopped: BaseException | None = None  # see ``stop``

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _changes(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def stop(self, exc: BaseException) -> None:
        """No call can succeed (a refused key …): every later ``wait`` raises ``exc``, every
        ``sleep`` in progress raises it now, and the listeners are told."""
        if self.stopped is not None:
            return
        self.stopped = exc
        self._disarm()
        self._notify()
        for nap in self._naps:
            if not nap.done():
                nap.set_result(None)
        for task, woken in list(self._waits.items()):
            if not woken:
                woken.append(True)
                task.cancel()
        for listener in list(self._listeners):
            listener(exc)

    def stop_error(self) -> BaseException:
        """The run-stopping error for one more call that may not go out: a copy of ``stopped``
        for each (an adapter attaches the answers its batch got to the error it raises; one
        object shared by every stopped batch would hand one batch's answers to another), with
        its attributes (status, response, body) but none of dfbatch's; ``stopped`` itself if
        it cannot be copied. ``is_stop`` tells either."""
        exc = self.stopped
        assert exc is not None
        try:
            fresh = type(exc).__new__(type(exc), *exc.args)
            fresh.__dict__.update({k: v for k, v in vars(exc).items()
                                   if not k.startswith("dfbatch_") and k != "partial"})
        except Exception:
            return exc
        fresh.__cause__, fresh.__context__ = exc.__cause__, exc.__context__
        fresh.dfbatch_stop_of = exc  # type: ignore[attr-defined]
        return fresh

    @contextlib.contextmanager
    def ends_waits(self) -> Iterator[None]:
        """Around a wait for the limits (a bucket, an in-flight slot): when the breaker stops,
        the wait ends at once with the run-stopping error (the call would not go out anyway;
        a run draining its calls in flight is not held by calls that never went)."""
        if self.stopped is not None:
            raise self.stop_error()
        task = asyncio.current_task()
        if task is None or task in self._waits:
            yield
            return
        woken: list[bool] = []
        self._waits[task] = woken
        try:
            yield
        except asyncio.CancelledError:
            if woken and task.uncancel() == 0:
                raise self.stop_error() from None
            raise
        finally:
            self._waits.pop(task, None)

    def is_stop(self, exc: BaseException) -> bool:
        """Is ``exc`` the run-stopping error (``stopped`` or one of its copies)?"""
        return self.stopped is not None and (
            exc is self.stopped or getattr(exc, "dfbatch_stop_of", None) is self.stopped)

    def listen(self, listener: Callable[[BaseException], None]) -> Callable[[], None]:
        """Call ``listener(exc)`` when the breaker stops (at once if it has); returns a
        function that stops listening."""
        if self.stopped is not None:
            listener(self.stopped)
        self._listeners.append(listener)

        def unlisten() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unlisten

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep(seconds)`` that raises the run-stopping error as soon as the breaker
        stops (a stopped run does not sit out a pause or a backoff)."""
        if self.stopped is None and seconds > 0:
            if self._sleep is not None:
                await self._sleep(seconds)
            else:
                loop = asyncio.get_running_loop()
                nap: asyncio.Future[None] = loop.create_future()
                timer = loop.call_later(seconds, _wake, nap)
                self._naps.add(nap)
                try:
                    await nap
                finally:
                    timer.cancel()
                    self._naps.discard(nap)
        if self.stopped is not None:
            raise self.stop_error()

    def try_pass(self) -> Ticket | None:
        """``wait`` without a coroutine while closed (the common case); None: await ``wait``."""
        if self.closed and self.stopped is None:
            if self._ticket.epoch != self.epoch:
                self._ticket = Ticket(False, self.epoch)
            return self._ticket
        return None

    async def wait(self) -> Ticket:
        """Wait until a call may be sent: at once while closed; when open, as the probe.
        Raises the run-stopping error after ``stop``."""
        while not self.closed:
            if self.stopped is not None:
                raise self.stop_error()
            now = self._now()
            if not self._probing and now >= self.next_probe:
                self._probing = True
                self.probes += 1
                return Ticket(True, self.epoch)
            if self._probing or self._timer:
                await self._changes()
                continue
            self._timer = True
            try:
                await self.sleep(self.next_probe - now)
            finally:
                self._timer = False
                self._notify()
        if self.stopped is not None:
            raise self.stop_error()
        return Ticket(False, self.epoch)

    def record(self, ticket: Ticket, health: Health) -> None:
        """How the call let through by ``ticket`` ended."""
        now = self._now()
        if health == "ok" and self.closed:  # (the common case, inlined: answered, _count)
            self._stalled_since = None
            self.last_ok = now
            if self._give_up is not None:
                self._disarm()
            if self.observer is not None:
                self.observer("ok")
            recent = self._recent
            if recent and now < recent[-1][0] + self._bin_s:
                recent[-1][1] += 1.0
            else:
                self._count(now, 0.0)
            self._in_a_row = 0
            return
        if health == "ok":
            self.answered(now)
        if health == "outage":
            self.stalled("outage")
            self._count(now, 1.0)
            if ticket.probe and not self.closed:
                self.interval = min(self.max_s, 2 * self.interval)
                self.next_probe = now + self.interval
                self._probing = False
                self._notify()
            elif self.closed:
                self._in_a_row += 1
                if self._in_a_row >= self.threshold or self._mostly_failing():
                    self._open(now)
            return
        self._count(now, 0.0)
        self._in_a_row = 0
        if not self.closed and (ticket.probe or ticket.epoch == self.epoch):
            self._close()

    def answered(self, now: float | None = None) -> None:
        """A call was answered: the run makes progress (the stall, if any, is over)."""
        self._stalled_since = None
        self.last_ok = self._now() if now is None else now
        self._disarm()
        if self.observer is not None:
            self.observer("ok")

    def stalled(self, cause: str) -> None:
        """A call failed with an outage or a rate-limit 429 (``cause``): stop the run once no
        call has been answered for ``give_up_s`` seconds (a timer: on time, not at the next
        failure, which a long Retry-After may put off)."""
        now = self._now()
        self._cause = cause
        if self.observer is not None:
            self.observer(cause)
        if self._stalled_since is None:
            self._stalled_since = now
            if self.give_up_s is not None and self.stopped is None and self._clock is None:
                self._give_up = asyncio.get_running_loop().call_later(self.give_up_s,
                                                                      self._stall_over)
        elif self.give_up_s is not None and now - self._stalled_since >= self.give_up_s:
            self._stall_over()

    def _stall_over(self) -> None:
        """``give_up_s`` seconds with no answer since the stall began: stop the run."""
        self._give_up = None
        if self._stalled_since is None or self.give_up_s is None:
            return  # pragma: no cover - an answer disarms the timer
        what = ("the service was unreachable or failing" if self._cause == "outage"
                else "every call was refused with a rate-limit 429")
        msg = (f"{what} for {self._now() - self._stalled_since:.0f} s with no call answered "
               f"(outage_timeout={self.give_up_s:g})")
        self.stop(NoProgressError(msg, cause=self._cause))

    def close(self) -> None:
        """The run is over: cancel the stall clock's timer (it must not fire after the run)."""
        self._disarm()

    def _disarm(self) -> None:
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None

    def cancel(self, ticket: Ticket) -> None:
        """The call of ``ticket`` was cancelled before it said anything: free the probe."""
        if ticket.probe and not self.closed and ticket.epoch == self.epoch:
            self._probing = False
            self._notify()

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """``async with breaker.admit(): send()``: wait, send, record how it ended."""
        ticket = await self.wait()
        try:
            yield ticket
        except Exception as exc:
            self.record(ticket, "outage" if classify(exc).outage else "other")
            raise
        except BaseException:
            self.cancel(ticket)
            raise
        self.record(ticket, "ok")

    def _count(self, now: float, outage: float) -> None:
        recent = self._recent
        if recent and now < recent[-1][0] + self._bin_s:
            last = recent[-1]
            last[1] += 1.0
            last[2] += outage
            return
        recent.append([now, 1.0, outage])
        while recent[0][0] < now - self.window_s:  # (whole bins: the window is 10 % longer)
            recent.popleft()

    def _mostly_failing(self) -> bool:
        n = sum(b[1] for b in self._recent)
        return n >= self.min_calls and sum(b[2] for b in self._recent) >= self.ratio * n

    def _open(self, now: float) -> None:
        self.closed = False
        self.opens += 1
        self.epoch += 1
        self.interval = self.first_s
        self.next_probe = now + self.first_s
        self._probing = False
        self._notify()

    def _close(self) -> None:
        self.closed = True
        self._in_a_row = 0
        self._recent.clear()
        self._probing = False
        self._notify()


def _wake(nap: asyncio.Future[None]) -> None:
    if not nap.done():
        nap.set_result(None)
