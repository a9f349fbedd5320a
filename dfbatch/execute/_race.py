"""Where a call meets its hedge: ``race`` for one call, ``Pending`` for the many calls of one
caller, ``Wakes`` (one timer per loop) for the decisions; the ages come from ``_hedge``'s plans.

A call that is not a straggler must cost next to nothing: cheap calls come by thousands a
second, and a decision is never due before ``MIN_WAKE_S``. So ``Pending`` keeps a caller's calls
in flight in the order they started (an entry in a dict, nothing more) and one timer at the
oldest call's *floor*: the earliest age at which any call, of any size, could be hedged, cut or
resent under the current fit. Only a call that reaches it gets its ``Race`` (the closures, a
plan for its size, an entry in ``Wakes`` at its own plan's ages); most calls end before.

Examples
--------
>>> import asyncio
>>> from dfbatch.execute._hedge import TailState
>>> state = TailState()
>>> for _ in range(40):
...     state.observe(100, 0.2)
>>> async def slow() -> str:
...     await asyncio.sleep(10)
...     return "slow"
>>> async def copy() -> str:
...     return "hedge"
>>> asyncio.run(race(slow, copy, lambda: state.plan(100, 0.9), queued=lambda: False,
...                  may_hedge=lambda queued: True))
'hedge'
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from dfbatch.errors import StragglerTimeoutError

T = TypeVar("T")


class Plan(Protocol):
    """What a race reads of a plan (``_hedge.Plan``: the ages at which it acts)."""

    @property
    def tail_after(self) -> float: ...
    @property
    def outlier_after(self) -> float: ...
    @property
    def deadline(self) -> float: ...
    @property
    def restart_after(self) -> float: ...

    def hedge_due(self, age: float, queued: bool) -> bool: ...

    def cut_at(self, hedged_at: float | None) -> float: ...

    def next_wake(self, age: float, hedged_at: float | None) -> float: ...

POLL_S, MAX_POLL_S = 0.05, 5.0  # a call that started before the model was fitted looks again
MIN_WAKE_S = 1e-3  # no decision before this age, and a timer fires at most once per this


async def race(call: Callable[[], Awaitable[T]], hedge: Callable[[], Awaitable[T]],
               plan: Callable[[], Plan | None], *, queued: Callable[[], bool],
               may_hedge: Callable[[bool], bool],
               hedge_sent: Callable[[], bool] = lambda: True,
               may_restart: Callable[[float], bool] = lambda age: False) -> T:
    """Await ``call`` in this task; per ``plan()`` (asked again at each decision, so a call
    that started before the model was fitted is covered too), add ``hedge`` or cut the call.
    The first answer wins; the other copy is cancelled. Every copy failed: the first copy's
    error is raised. ``hedge_sent``: has the hedge got past the run's limits? A failed call
    waits for a hedge that went out, never for one still waiting for the limits the failed
    call holds (that could wait forever).

    The decisions run from the loop's ``Wakes`` (one timer for every race: a heap of wake-up
    times), not from a timer or a task per call; a task starts only when a hedge is sent.
    (``Pending`` does the same for many calls, building a race only for a late one.)"""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    race_ = Race(loop, me, loop.time(), hedge, plan, queued, may_hedge, may_restart,
                  hedge_sent)
    race_.start(race_.t0)
    try:
        try:
            result = await call()
        except BaseException as exc:
            if race_.after_error(exc):
                return await race_.wait_copy()
            return race_.outcome()
        return race_.answered(result)
    finally:
        copy = race_.close()
        if copy is not None:
            await asyncio.gather(copy, return_exceptions=True)


def _uncancel(task: asyncio.Task[Any]) -> int:
    """Take back one cancel request of ours; the requests left (others' cancels)."""
    return task.uncancel()


class Race(Generic[T]):
    """The decisions and the hedge of one call: ``ended`` is "won" (the hedge answered first,
    the call's task was cancelled), "cut" (past the plan's deadline) or "restart" (past
    ``restart_after`` while work waits: resent at once); None while it runs. ``t0``: when the
    call started (a race may be built after that, by ``Pending``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], t0: float,
                 hedge: Callable[[], Awaitable[T]], plan: Callable[[], Plan | None],
                 queued: Callable[[], bool], may_hedge: Callable[[bool], bool],
                 may_restart: Callable[[float], bool] = lambda age: False,
                 hedge_sent: Callable[[], bool] = lambda: True) -> None:
        self.loop, self.task, self.t0, self.hedge, self.plan = loop, task, t0, hedge, plan
        self.queued, self.may_hedge, self.may_restart = queued, may_hedge, may_restart
        self.hedge_sent = hedge_sent
        self.wakes = _wakes(loop)
        self.hedged_at: float | None = None
        self.copy: asyncio.Task[T] | None = None
        self.ended: str | None = None
        self.first_error: Exception | None = None
        self.age = 0.0
        self.poll = POLL_S  # no plan yet: look again after 0.05 s, 0.1 s, 0.2 s ...
        self.closed = False

    def start(self, now: float) -> None:
        """Arm the first decision, as a race armed when the call started (``t0``) would have:
        decide at once when that is already past."""
        p = self.plan()
        if p is None:
            wake, self.poll = self.poll, min(2 * self.poll, MAX_POLL_S)
        else:
            wake = p.next_wake(0.0, None)
        at = self.t0 + max(wake, MIN_WAKE_S)
        if at <= now:
            self._decide()
        else:
            self.wakes.add(at, self)

    def _arm(self) -> None:
        p = self.plan()
        now = self.loop.time()
        if p is None:
            wake, self.poll = self.poll, min(2 * self.poll, MAX_POLL_S)
        else:
            wake = p.next_wake(now - self.t0, self.hedged_at)
        self.wakes.add(now + max(wake, MIN_WAKE_S), self)

    def _decide(self) -> None:
        if self.closed or self.ended is not None or self.task.done():
            return
        p = self.plan()
        age = self.loop.time() - self.t0
        if p is not None and self.hedged_at is None:
            q = self.queued()
            if p.hedge_due(age, q) and self.may_hedge(q):
                self.hedged_at = age
                self.copy = self.loop.create_task(self.hedge())  # type: ignore[arg-type]
                self.copy.add_done_callback(self._copy_done)
                self._arm()
                return
            if q and age >= p.restart_after and self.may_restart(age):
                self._end("restart", age)  # a fresh call is expected to finish sooner
                return
        if p is not None and age >= p.cut_at(self.hedged_at):
            self._end("cut", age)
            return
        self._arm()

    def _copy_done(self, copy: asyncio.Task[T]) -> None:
        if self.closed or self.ended is not None or self.first_error is not None:
            return
        if not copy.cancelled() and copy.exception() is None:
            self._end("won", self.loop.time() - self.t0)

    def _end(self, how: str, age: float) -> None:
        self.ended, self.age = how, age
        self.task.cancel()

    def answered(self, result: T) -> T:
        """The call answered: its result, or the race's (fn swallowed our cancel)."""
        if self.ended is not None:
            _uncancel(self.task)
            return self.outcome()
        return result

    def after_error(self, exc: BaseException) -> bool:
        """The call raised ``exc`` (from inside the ``except``). Raises it when it stands;
        False: the race decided (``outcome``); True: wait for the hedge (``wait_copy``)."""
        if isinstance(exc, asyncio.CancelledError):
            if self.ended is None or _uncancel(self.task) > 0:
                raise exc  # not (only) ours: the run stops, or a timeout fired
            return False
        if not isinstance(exc, Exception):
            raise exc
        if self.ended is not None:  # fn turned our cancel into an error
            _uncancel(self.task)
            return False
        if self.copy is not None and not self.copy.done() and self.hedge_sent():
            self.first_error = exc  # the first copy failed: wait for the hedge
            return True
        raise exc

    async def wait_copy(self) -> T:
        """The first copy failed and the hedge still runs: its answer, or the first error."""
        assert self.copy is not None and self.first_error is not None
        try:
            return await asyncio.shield(self.copy)
        except asyncio.CancelledError:
            if self.ended is None or _uncancel(self.task) > 0:
                raise
            return self.outcome()
        except Exception:
            raise self.first_error from None

    def outcome(self) -> T:
        if self.ended == "won":
            assert self.copy is not None
            return self.copy.result()
        if self.ended == "restart":  # resent at once: a fresh call is expected to be faster
            msg = (f"the call ran {self.age:.1f} s, in the heavy tail of the latency for its "
                   f"size: cut and resent (within hedge_budget; hedge_after=None turns it off)")
            raise StragglerTimeoutError(msg, retry_after=0.0)
        msg = (f"the call ran {self.age:.1f} s, far past the latency expected for its size "
               f"(adaptive timeout, hedge_after; set hedge_after=None to turn it off)")
        raise StragglerTimeoutError(msg)

    def close(self) -> asyncio.Task[T] | None:
        """The race is over: a hedge still running is cancelled and returned (await it)."""
        self.closed = True  # (its entry in the wakes' heap is skipped when it comes due; until
        # then the entry keeps this race: it holds nothing big, such as the batch's frame)
        self.hedge = self.plan = self.queued = _gone  # type: ignore[assignment]
        self.may_hedge = self.may_restart = self.hedge_sent = _gone  # type: ignore[assignment]
        copy = self.copy
        if copy is None or copy.done():
            return None
        copy.cancel()
        return copy


def _gone(*args: object) -> Any:
    msg = "a closed race was asked to act"
    raise AssertionError(msg)


class Pending:
    """The calls of one caller in flight on ``loop``, raced lazily (see the module docstring).

    ``add(task, args)`` as a call starts; ``end(task)`` as it ends gives its ``Race`` when it
    got one (handle the call's end with it, then ``close`` it), else None. ``floor()``: the
    earliest age at which a decision could be due for any call now (>= ``MIN_WAKE_S``);
    ``make(task, t0, args)`` builds the race of a call that reached it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, floor: Callable[[], float],
                 make: Callable[[asyncio.Task[Any], float, Any], Race[Any]]) -> None:
        self.loop, self.floor, self.make = loop, floor, make
        self.fresh: dict[asyncio.Task[Any], tuple[float, Any]] = {}  # in start order
        self.races: dict[asyncio.Task[Any], Race[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], args: Any) -> None:
        now = self.loop.time()
        self.fresh[task] = (now, args)
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.floor(), self._fire)

    def end(self, task: asyncio.Task[Any]) -> Race[Any] | None:
        if self.fresh.pop(task, None) is not None:
            return None
        return self.races.pop(task, None)

    def close(self) -> None:
        """The run is over: its decision timer goes (a call still in flight gets no race)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        fresh, loop = self.fresh, self.loop
        if not fresh:
            return
        now = loop.time()
        try:
            floor = self.floor()
            while fresh:
                task, (t0, args) = next(iter(fresh.items()))
                if t0 + floor > now:
                    break
                del fresh[task]
                race_ = self.races[task] = self.make(task, t0, args)
                race_.start(now)
        except Exception as exc:  # (as a timer of its own would report it)
            loop.call_exception_handler({"message": "a hedge decision failed", "exception": exc})
            floor = POLL_S
        if fresh:
            t0 = next(iter(fresh.values()))[0]
            self._timer = loop.call_at(max(t0 + floor, now + MIN_WAKE_S), self._fire)


def first_decision(p: Plan | None, waiting: Callable[[], bool]) -> float:
    """The earliest age at which plan ``p`` may act on a call (>= ``MIN_WAKE_S``); ``waiting``:
    is work waiting now (then a call in the run's tail is looked at again a poll later)?"""
    if p is None:
        return POLL_S
    first = min(p.outlier_after, p.restart_after, p.deadline)
    if p.tail_after < first:
        tail = p.tail_after
        first = min(first, tail + max(0.01, tail / 4)) if waiting() else tail
    return max(first, MIN_WAKE_S)


class Wakes:
    """One timer for every race on a loop: a heap of ``(when, n, race)``, the timer armed at
    the earliest (a timer per call costs more than a no-op call). A closed race's entry is
    skipped when it comes due; the heap is rebuilt when such entries pile up. The timer
    fires at most once a millisecond, taking every entry due by then."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, Race[Any]]] = []
        self._n = 0
        self._at = math.inf  # when the timer fires
        self._timer: asyncio.TimerHandle | None = None
        self._firing = False

    def add(self, when: float, race_: Race[Any]) -> None:
        self._n += 1
        heapq.heappush(self.heap, (when, self._n, race_))
        if when < self._at and not self._firing:  # (a firing timer re-arms at the heap's top)
            if self._timer is not None:
                self._timer.cancel()
            self._at = when
            self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._firing = None, True
        heap, now = self.heap, self.loop.time()
        try:
            while heap and heap[0][0] <= now:  # (a race re-adds itself at least 1 ms later)
                race_ = heapq.heappop(heap)[2]
                if not race_.closed:
                    try:
                        race_._decide()
                    except Exception as exc:  # (as a timer of its own would: others go on)
                        self.loop.call_exception_handler(
                            {"message": "a hedge decision failed", "exception": exc})
        finally:
            self._firing = False
        self._at = math.inf
        if len(heap) > 1024:
            live = [e for e in heap if not e[2].closed]
            if 4 * len(live) < len(heap):
                heapq.heapify(live)
                self.heap = heap = live
        if heap:
            self._at = max(heap[0][0], now + MIN_WAKE_S)
            self._timer = self.loop.call_at(self._at, self._fire)


_WAKES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wakes] = \
    weakref.WeakKeyDictionary()


def _wakes(loop: asyncio.AbstractEventLoop) -> Wakes:
    """The loop's ``Wakes`` (one per event loop)."""
    got = _WAKES.get(loop)
    if got is None:
        got = _WAKES[loop] = Wakes(loop)
    return got
