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

import asyncio
import contextlib
import dataclasses
import functools
import math
import operator
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from dfbatch.errors import ConfigError, FatalError
from dfbatch.execute._breaker import Breaker, Ticket
from dfbatch.execute._headers import RateHints, parse_headers
from dfbatch.execute._limits import Cost, Limit, Outcome
from dfbatch.execute._rate import RateLimit
from dfbatch.execute._retry import classify, header_items

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
    # inside another request of this binding (``request`` nested in ``request``): the outer
    # one holds the breaker's pass (maybe the probe, which the inner would wait for for ever)
    nested: bool = False


class Pace(Protocol):
    """Told where each request of a call stands (the run's call timeout does not count while
    the call's requests only wait for the run's own limits, pause or breaker)."""

    def waiting(self) -> None:
        """A request starts waiting for the run's limits."""

    def sent(self) -> None:
        """A request that waited goes out."""

    def ended(self, sent: bool) -> None:
        """A request is over (``sent``: it went out; else its wait was abandoned)."""


# the binding and the loop it was bound on (the run's: its limits live there)
_Bound = tuple[Binding, asyncio.AbstractEventLoop | None]
_bound: ContextVar[_Bound | None] = ContextVar("dfbatch_limits", default=None)
_running_loop = asyncio._get_running_loop  # (None outside a loop; no exception to catch)


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
    token = _bound.set((binding, _running_loop()))
    try:
        yield binding
    finally:
        _bound.reset(token)


def enter(binding: Binding) -> Token[_Bound | None]:
    """``bind_run_limits`` without a context manager, for a hot path: ``leave(enter(b))``."""
    return _bound.set((binding, _running_loop()))


def leave(token: Token[_Bound | None]) -> None:
    _bound.reset(token)


def bound() -> Binding | None:
    """The binding of the current run, or ``None`` outside a run."""
    found = _bound.get()
    return None if found is None else found[0]


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
        """The answer's headers (a mapping such as a dict or ``httpx.Headers``, or a list of
        ``(name, value)`` pairs; ``bytes`` or ``str``; rate-limit ones are read) and its real
        tokens (prompt + completion), so the limits learn the provider's state and refund
        estimates."""
        if headers is not None:
            hints = parse_headers(header_items(headers, what="req.report(headers=...)"))
            self.hints = None if hints.empty else hints
        if tokens is not None:
            self.actual_tokens = _token_count(tokens, "req.report(tokens=...)")


def _token_count(tokens: Any, where: str = "dfbatch.limits.request(tokens=...)") -> int:
    """``tokens`` as a whole number of tokens >= 0 (a float is rounded up), or a
    ``ConfigError`` that says what to pass."""
    if not isinstance(tokens, bool):
        try:
            count: int | None = operator.index(tokens)  # int, numpy integers
        except TypeError:
            count = math.ceil(tokens) if isinstance(tokens, float) and math.isfinite(tokens) \
                else None
        if count is not None and count >= 0:
            return count
    msg = (f"{where} takes a number of tokens, an integer >= 0 (what the provider counts: "
           f"the prompt and max_tokens), got {tokens!r}; pass 0 when you do not count them")
    raise ConfigError(msg)


@contextlib.asynccontextmanager
async def request(tokens: int = 0) -> AsyncIterator[Request]:
    """Charge one request of ``tokens`` to the run's limits for the body of the ``async with``.

    Waits while a limit, a pause or an open breaker says so; an exception in the body is
    classified (rate-limit 429, overload, outage …) and reported, then re-raised unchanged.
    Outside a run it charges nothing and does not wait. ``tokens`` must be an integer >= 0
    (``ConfigError`` otherwise); inside a run, a request of more tokens than the whole token
    limit a minute raises ``FatalError`` (the provider would refuse it; waiting would hold
    the run). From another event loop than the run's (a sync fn running ``asyncio.run`` in a
    worker thread) the run's limits are charged on the run's loop.
    """
    req = Request(_token_count(tokens))
    found = _bound.get()
    if found is None:
        yield req
        return
    binding, home = found
    _check_fits(binding, req.tokens)
    if home is not None and home is not _running_loop():
        async with _charged_across(binding, req, home) as charged, _within(binding, home):
            yield charged
        return
    pace = binding.pace
    if pace is None:
        async with _charged(binding, req) as charged, _within(binding, home):
            yield charged
        return
    pace.waiting()
    try:
        async with _charged(binding, req, pace) as charged, _within(binding, home):
            yield charged
    finally:
        pace.ended(req.charged)


@contextlib.asynccontextmanager
async def _within(binding: Binding, home: asyncio.AbstractEventLoop | None
                  ) -> AsyncIterator[None]:
    """The body of a charged request: a request nested in it (a wrapper around an adapter
    that charges its own) is charged the rates, but passes the breaker with the outer one:
    waiting for the breaker there waited for the outer request, the probe of an outage, and
    the run stalled until outage_timeout though the service was back."""
    if binding.nested:
        yield
        return
    token = _bound.set((dataclasses.replace(binding, nested=True), home))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # (a request never closed, finalized elsewhere)
            _bound.reset(token)


def _check_fits(binding: Binding, tokens: int) -> None:
    """A request over the run's whole token limit a minute can never go: say so, not wait."""
    if not tokens:
        return
    for limit in getattr(binding.limits, "limits", ()):
        if isinstance(limit, RateLimit) and limit.tokens and 0 < limit.largest < tokens:
            what = (f"{limit.per_minute:g} a minute, from tpm= or the provider's "
                    "x-ratelimit-limit-tokens" if limit.largest == limit.per_minute else
                    f"{limit.largest:g} a window of {limit.log.window_s:g} s, as the "
                    "provider's RateLimit-Policy states")
            msg = (f"a request of {tokens} tokens is more than the run's whole token limit "
                   f"({what}): the provider refuses it as too large; send "
                   "fewer tokens per request (a shorter prompt, a lower max_tokens) or raise tpm=")
            raise FatalError(msg)


async def _take(binding: Binding, req: Request) -> Ticket | None:
    """Acquire one request's share of the run's limits and pass the breaker (its ticket)."""
    cost = Cost(tokens=req.tokens)
    breaker = None if binding.nested else binding.breaker
    if breaker is None:
        await binding.limits.acquire(cost)
    else:
        with breaker.ends_waits():  # (a stop ends the wait: this request would not go out)
            await binding.limits.acquire(cost)
    try:  # the breaker last: a request that waited for a bucket while the service went down
        ticket = await breaker.wait() if breaker is not None else None  # does not go out then
    except BaseException:
        binding.limits.release(cost, None)
        raise
    req.charged = True
    return ticket


def _settle(binding: Binding, req: Request, ticket: Ticket | None,
            exc: BaseException | None, *, failed: bool) -> None:
    """Report how a charged request ended: answered (``failed`` False), failed with ``exc``
    (classified: a 429, an outage ...) or abandoned (``exc`` None and ``failed``)."""
    cost, breaker = Cost(tokens=req.tokens), binding.breaker
    if not failed:
        binding.limits.release(cost, Outcome(ok=True, actual_tokens=req.actual_tokens,
                                             hints=req.hints))
        if breaker is not None and ticket is not None:
            breaker.record(ticket, "ok")
    elif exc is None:
        binding.limits.release(cost, None)
        if breaker is not None and ticket is not None:
            breaker.cancel(ticket)
    else:
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


@contextlib.asynccontextmanager
async def _charged(binding: Binding, req: Request, pace: Pace | None = None
                   ) -> AsyncIterator[Request]:
    ticket = await _take(binding, req)
    try:
        if pace is not None:
            pace.sent()
        yield req
    except Exception as exc:
        _settle(binding, req, ticket, exc, failed=True)
        raise
    except BaseException:
        _settle(binding, req, ticket, None, failed=True)
        raise
    _settle(binding, req, ticket, None, failed=False)


class _Handoff:
    """A request charged on the run's loop for another loop: who gives the units back when
    the requester stops waiting just as they were taken (``lock`` guards both flags)."""

    __slots__ = ("abandoned", "lock", "taken", "ticket")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = self.taken = False
        self.ticket: Ticket | None = None


async def _take_for(binding: Binding, req: Request, handoff: _Handoff) -> Ticket | None:
    ticket = await _take(binding, req)
    with handoff.lock:
        if not handoff.abandoned:
            handoff.taken, handoff.ticket = True, ticket
            return ticket
    _settle(binding, req, ticket, None, failed=True)  # nobody waits for it any more
    return None


def _at_home(home: asyncio.AbstractEventLoop, settle: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the run's loop is closed: the run is over
        home.call_soon_threadsafe(settle)


@contextlib.asynccontextmanager
async def _charged_across(binding: Binding, req: Request, home: asyncio.AbstractEventLoop
                          ) -> AsyncIterator[Request]:
    """``_charged`` for a request made on another event loop than the run's: the limits
    (asyncio objects of the run's loop) are taken and given back there, thread-safely."""
    handoff = _Handoff()
    try:
        future = asyncio.run_coroutine_threadsafe(_take_for(binding, req, handoff), home)
    except RuntimeError:  # the run's loop is closed: the run is over, nothing to charge
        yield req
        return
    try:
        ticket = await asyncio.wrap_future(future)
    except BaseException:
        with handoff.lock:
            handoff.abandoned = True
            taken = handoff.taken
        if taken:  # taken just as this wait ended: give it back
            _at_home(home, functools.partial(_settle, binding, req, handoff.ticket, None,
                                             failed=True))
        raise
    try:
        yield req
    except Exception as exc:
        _at_home(home, functools.partial(_settle, binding, req, ticket, exc, failed=True))
        raise
    except BaseException:
        _at_home(home, functools.partial(_settle, binding, req, ticket, None, failed=True))
        raise
    _at_home(home, functools.partial(_settle, binding, req, ticket, None, failed=False))


def count_tokens(texts: list[str], model: str | None = None) -> list[int]:
    """Token counts of ``texts``: the run's counter when bound, else ``model``'s tiktoken
    encoding (``cl100k_base`` for a model tiktoken does not know)."""
    binding = bound()
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
