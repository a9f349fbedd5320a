"""Charge the run's limits where requests are sent: from inside fn, once per HTTP request.

The run binds its limit stack (request rate, token rate, global pause) and its circuit breaker
to the context of each fn call with ``bind_run_limits``; ``request(tokens=n)`` then charges one
request of ``n`` tokens there, waits as the limits say, and reports how the request ended (a
429, an outage, the answer's rate-limit headers, the real tokens) back to them. Outside a run
(no binding) it does nothing and never waits. ``dfbatch.limits`` is its public face.

An fn that charges its own requests says so with ``dfbatch_charges = "request"`` (see
``per_request``); the run then skips its per-call request / token charge for it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from dfbatch.execute._breaker import Breaker
from dfbatch.execute._headers import RateHints, parse_headers
from dfbatch.execute._limits import Cost, Limit, Outcome
from dfbatch.execute._retry import classify

CHARGES_ATTR = "dfbatch_charges"
SENDS_ATTR = "dfbatch_sends"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Binding:
    """What a run binds around each fn call: its per-request limits, breaker, token counter."""

    limits: Limit
    breaker: Breaker | None = None
    count: Callable[[list[str]], Any] | None = None
    pace: Pace | None = None


class Pace(Protocol):
    """Told where each request of a call stands (the run's call timeout does not count while
    the call's requests only wait for the run's own limits, pause or breaker)."""

    def waiting(self) -> None:
        """A request starts waiting for the run's limits."""

    def sent(self) -> None:
        """A request that waited goes out."""

    def ended(self, sent: bool) -> None:
        """A request is over (``sent``: it went out; else its wait was abandoned)."""


_bound: ContextVar[Binding | None] = ContextVar("dfbatch_limits", default=None)


@contextlib.contextmanager
def bind_run_limits(
    limits: Limit,
    *,
    breaker: Breaker | None = None,
    count: Callable[[list[str]], Any] | None = None,
    pace: Pace | None = None,
) -> Iterator[Binding]:
    """Make ``limits`` (acquired and released once per request) and ``breaker`` the ones that
    ``request()`` charges, in this context (the run wraps each fn call in it; a sync fn's
    thread gets it through ``contextvars.copy_context``). ``pace`` is told as each request
    starts waiting, goes out and ends (the run's call timeout counts from the sends)."""
    binding = Binding(limits, breaker, count, pace)
    token = _bound.set(binding)
    try:
        yield binding
    finally:
        _bound.reset(token)


def enter(binding: Binding) -> Token[Binding | None]:
    """``bind_run_limits`` without a context manager, for a hot path: ``leave(enter(b))``."""
    return _bound.set(binding)


def leave(token: Token[Binding | None]) -> None:
    _bound.reset(token)


def bound() -> Binding | None:
    """The binding of the current run, or ``None`` outside a run."""
    return _bound.get()


def charges_per_request(fn: Any) -> bool:
    """Does ``fn`` charge every request itself (``dfbatch_charges == "request"``)?"""
    return getattr(fn, CHARGES_ATTR, None) == "request"


def per_request(fn: F, *, sends: Literal["rows", "one"] = "rows") -> F:
    """Mark ``fn`` as charging every request it sends through ``request()`` (returns ``fn``).

    ``sends`` says how many requests one call makes: ``"rows"`` (one per row, or any number:
    a bigger batch is not fewer requests) or ``"one"`` (one per call, as ``chat(mode="batch")``
    and ``embed``: a bigger batch is fewer requests).
    """
    setattr(fn, CHARGES_ATTR, "request")
    setattr(fn, SENDS_ATTR, sends)
    return fn


def one_request_per_call(fn: Any) -> bool:
    """Does a bigger batch mean fewer requests? True for a plain fn (charged per call) and for
    one marked ``per_request(fn, sends="one")``; False for one that sends a request per row."""
    return not charges_per_request(fn) or getattr(fn, SENDS_ATTR, None) == "one"


@dataclass(slots=True)
class Request:
    """One request being charged: report what the answer said with ``report``."""

    tokens: int
    hints: RateHints | None = None
    actual_tokens: int | None = None
    charged: bool = field(default=False)

    def report(self, *, headers: Any = None, tokens: int | None = None) -> None:
        """The answer's headers (any mapping; rate-limit ones are read) and its real tokens
        (prompt + completion), so the limits learn the provider's state and refund estimates."""
        if headers is not None:
            hints = parse_headers(headers)
            self.hints = None if hints.empty else hints
        if tokens is not None:
            self.actual_tokens = int(tokens)


@contextlib.asynccontextmanager
async def request(tokens: int = 0) -> AsyncIterator[Request]:
    """Charge one request of ``tokens`` to the run's limits for the body of the ``async with``.

    Waits while a limit, a pause or an open breaker says so; an exception in the body is
    classified (rate-limit 429, overload, outage …) and reported, then re-raised unchanged.
    Outside a run it charges nothing and does not wait.
    """
    req = Request(int(tokens))
    binding = _bound.get()
    if binding is None:
        yield req
        return
    pace = binding.pace
    if pace is None:
        async with _charged(binding, req) as charged:
            yield charged
        return
    pace.waiting()
    try:
        async with _charged(binding, req, pace) as charged:
            yield charged
    finally:
        pace.ended(req.charged)


@contextlib.asynccontextmanager
async def _charged(binding: Binding, req: Request, pace: Pace | None = None
                   ) -> AsyncIterator[Request]:
    cost = Cost(tokens=req.tokens)
    breaker = binding.breaker
    await binding.limits.acquire(cost)
    try:  # the breaker last: a request that waited for a bucket while the service went down
        ticket = await breaker.wait() if breaker is not None else None  # does not go out then
    except BaseException:
        binding.limits.release(cost, None)
        raise
    req.charged = True
    try:
        if pace is not None:
            pace.sent()
        yield req
    except Exception as exc:
        d = classify(exc)
        binding.limits.release(cost, Outcome(
            ok=False, rate_limited=d.rate_limited, timed_out=d.cause == "timeout",
            retry_after=d.retry_after, overloaded=d.overloaded,
            hints=None if d.hints.empty else d.hints,
        ))
        if breaker is not None and ticket is not None:
            breaker.record(ticket, "outage" if d.outage else "other")
        if breaker is not None and d.kind == "fatal_run":
            breaker.stop(exc)  # no later request of the run goes out
        raise
    except BaseException:
        binding.limits.release(cost, None)
        if breaker is not None and ticket is not None:
            breaker.cancel(ticket)
        raise
    binding.limits.release(cost, Outcome(ok=True, actual_tokens=req.actual_tokens,
                                         hints=req.hints))
    if breaker is not None and ticket is not None:
        breaker.record(ticket, "ok")


def count_tokens(texts: list[str], model: str | None = None) -> list[int]:
    """Token counts of ``texts``: the run's counter when bound, else ``model``'s tiktoken
    encoding (``cl100k_base`` for a model tiktoken does not know)."""
    binding = _bound.get()
    if binding is not None and binding.count is not None:
        return [int(n) for n in binding.count(texts)]
    return [int(n) for n in _counter_for(model or "cl100k_base")(texts)]


@functools.lru_cache(maxsize=16)
def _counter_for(model: str) -> Callable[[list[str]], Any]:
    from dfbatch.errors import TokenizerError
    from dfbatch.plan._tokens import get_counter

    try:
        return get_counter(model)
    except TokenizerError:
        return get_counter("cl100k_base")
