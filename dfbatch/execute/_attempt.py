"""The parts of one fn call: its pass through the breaker, its timeout, how it is awaited.

``Grant`` holds what one plain call needs (the agent's bytes, the run's limits, the breaker's
pass), taken without a coroutine when nothing must wait, and frees a breaker pass the call left
unrecorded. ``call_paced`` runs an fn that charges each of its requests (``Pace``: the timeout
counts from the last request sent). ``is_async`` tells an async fn (or callable object) from a
plain one; ``size_related`` tells errors a smaller batch could have avoided. Where a plain fn
runs (threads, processes, inline) is ``_executors``'.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from dfbatch.execute._breaker import Breaker, Health, Ticket
from dfbatch.execute._charge import Binding, bind_run_limits
from dfbatch.execute._executors import WorkerDiedError as WorkerDiedError  # (for _caller)
from dfbatch.execute._executors import check_importable as check_importable
from dfbatch.execute._limits import CapacityLimit, Cost, Hold, Limits


@dataclass(slots=True)
class Pass:
    """One call's pass through the breaker (``ticket`` None: no breaker for this call)."""

    breaker: Breaker | None
    ticket: Ticket | None
    done: bool = False

    def record(self, health: Health) -> None:
        if self.breaker is not None and self.ticket is not None and not self.done:
            self.breaker.record(self.ticket, health)
            self.done = True


_NO_BREAKER = Pass(None, None)  # (never recorded: shared by every call without a breaker)
_NOT_YET = Pass(None, None)  # a grant that holds no pass yet


class Grant(Hold):
    """One attempt's hold on the agent's bytes in flight (``nbytes``), the run's ``limits``
    (``outcome`` reaches them at release, as ``Hold``'s) and the breaker's pass (``ticket``),
    taken in that order: the breaker last, so a call that waited for a bucket while the
    service went down does not go out then.

    ``try_enter()`` takes everything at once, without a coroutine, when nothing must wait
    (the common case); else ``await enter()`` waits for the rest, in the same order. A
    cancelled or failed ``enter`` leaves nothing held; ``release()`` frees everything held
    (an unrecorded pass too), once, on every path:
    ``if not g.try_enter(): await g.enter()`` then ``try: ... finally: g.release()``.

    Examples
    --------
    >>> import asyncio
    >>> from dfbatch.execute._limits import CapacityLimit, Cost, Limits
    >>> async def demo():
    ...     nbytes, slots = CapacityLimit(100), CapacityLimit(1)
    ...     first = Grant(Limits([slots]), Cost(nbytes=10), nbytes, None)
    ...     second = Grant(Limits([slots]), Cost(nbytes=10), nbytes, None)
    ...     at_once = first.try_enter(), second.try_enter()  # one slot: the second waits
    ...     waiting = asyncio.ensure_future(second.enter())
    ...     first.release(); await waiting; second.release()
    ...     return at_once, slots.in_use, nbytes.in_use
    >>> asyncio.run(demo())
    ((True, False), 0.0, 0.0)
    """

    __slots__ = ("breaker", "bytes_held", "nbytes", "ticket")

    def __init__(self, limits: Limits, cost: Cost, nbytes: CapacityLimit,
                 breaker: Breaker | None) -> None:
        self.limit, self.cost, self.held = limits, cost, False
        self.outcome = None
        self.nbytes, self.breaker, self.bytes_held = nbytes, breaker, False
        self.ticket = _NOT_YET

    def try_enter(self) -> bool:
        """Take the bytes, the limits (all or none) and the pass now, as far as each can
        pay without a wait; True when everything is held (call it once, first)."""
        cost = self.cost
        if not self.nbytes.try_acquire(cost):
            return False
        self.bytes_held = True
        try:
            if not self.limit.try_acquire(cost):
                return False
        except BaseException:  # (a limit that fails gets nothing held back)
            self.release()
            raise
        self.held = True
        breaker = self.breaker
        if breaker is None:
            self.ticket = _NO_BREAKER
            return True
        ticket = breaker.try_pass()
        if ticket is None:
            return False
        self.ticket = Pass(breaker, ticket)
        return True

    async def enter(self) -> Grant:
        """Wait for what ``try_enter`` could not take (all of it when it was not called);
        a stop of the breaker ends the wait with the run-stopping error."""
        if self.breaker is None:
            return await self._enter()
        with self.breaker.ends_waits():
            return await self._enter()

    async def _enter(self) -> Grant:
        cost = self.cost
        try:
            if not self.bytes_held:
                if not self.nbytes.try_acquire(cost):
                    await self.nbytes.acquire(cost)
                self.bytes_held = True
                self.held = self.limit.try_acquire(cost)
            if not self.held:  # (its all-or-none try failed: wait limit by limit)
                await self.limit.acquire(cost)
                self.held = True
            if self.ticket is _NOT_YET:
                breaker = self.breaker
                if breaker is None:
                    self.ticket = _NO_BREAKER
                else:
                    ticket = breaker.try_pass()
                    self.ticket = Pass(breaker, ticket if ticket is not None
                                       else await breaker.wait())
        except BaseException:
            self.release()
            raise
        return self

    async def __aenter__(self) -> Grant:
        if not self.try_enter():
            await self.enter()
        return self

    async def reacquire(self) -> None:
        await self.enter()

    def release(self) -> None:
        ticket, self.ticket = self.ticket, _NOT_YET
        if ticket.breaker is not None and not ticket.done:
            ticket.breaker.cancel(ticket.ticket)  # type: ignore[arg-type]
        if self.held:
            self.held = False
            self.limit.release(self.cost, self.outcome)
        if self.bytes_held:
            self.bytes_held = False
            self.nbytes.release(self.cost)


async def call_paced(fn: Callable[[pl.DataFrame], Any], df: pl.DataFrame, timeout: float,  # noqa: ASYNC109
                     binding: Binding) -> Any:
    """Call an fn that charges per request: the timeout counts from its last request sent,
    not from the call's start (its requests may wait for the run's limits meanwhile)."""
    async with asyncio.timeout(timeout) as deadline:
        pace = Pace(deadline, timeout)
        try:
            with bind_run_limits(binding.limits, breaker=binding.breaker, pace=pace):
                value = await fn(df)
            if inspect.isawaitable(value):
                value = await value
            return value
        finally:  # requests fn left running (a gather that raised) no longer move it
            pace.over = True


class Pace:
    """A per-request fn's call timeout: it counts from the last request sent, and stops while
    the call's requests only wait for the run's limits, pause or breaker (none in flight)."""

    def __init__(self, deadline: asyncio.Timeout, timeout: float) -> None:
        self.deadline, self.timeout = deadline, timeout
        self.loop = asyncio.get_running_loop()
        self.waits = self.flying = 0
        self.over = False  # the call ended: its deadline can no longer be moved

    def waiting(self) -> None:
        self.waits += 1
        self._update()

    def sent(self) -> None:
        self.waits -= 1
        self.flying += 1
        if not self.over:
            self.deadline.reschedule(self.loop.time() + self.timeout)

    def ended(self, sent: bool) -> None:
        if sent:
            self.flying -= 1
        else:
            self.waits -= 1
        self._update()

    def _update(self) -> None:
        if self.over or self.deadline.expired():
            return
        if self.waits and not self.flying:
            self.deadline.reschedule(None)
        elif self.deadline.when() is None:
            self.deadline.reschedule(self.loop.time() + self.timeout)


_SIZE_WORDS = ("context length", "context_length", "too many tokens", "too large", "maximum")


def size_related(exc: BaseException, status: int | None) -> bool:
    """Could a smaller batch have avoided this error? (timeouts, 413, context-length 400s)"""
    if isinstance(exc, TimeoutError) or status == 413:
        return True
    text = str(exc).lower()
    return status in (400, None) and any(w in text for w in _SIZE_WORDS)


def is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
