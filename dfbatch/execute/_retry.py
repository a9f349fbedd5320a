"""What a failed call means, and how long to wait: classification and full-jitter backoff.

``classify(exc)`` gives a ``Decision`` whose ``kind`` says who is at fault:

``"row"``
    Something in the batch's rows (HTTP 400 / 413 / 422, a 429 "request too large", an output
    of the wrong shape, any exception of fn not known to be transient, ``FatalError``): not
    retried; a multi-row batch is bisected (``bisect``) so the bad row fails alone. An
    ``OutputError`` is not bisected (the batch's answer as a whole does not fit).
``"transient"``
    The service, not the rows (5xx, timeouts and a gateway's 408, connection errors, an
    overloaded server's 429 or 503, 409, ``RetryableError``): retried after a backoff, never
    bisected.
``"rate_limited"``
    A rate-limit 429 (or a ``RetryableError`` saying so): retried after the server's hint or
    a global pause; it does not use up the attempts errors do.
``"fatal_run"``
    Account-wide (401 bad key, 402 / 429 ``insufficient_quota`` or OpenAI's words for it
    with no wait said, 403 permission, 404 unknown
    model, 404 / 405 from a model API's endpoint: a wrong ``base_url``), or dfbatch's own API
    misused inside fn (a ``ConfigError``, e.g. ``report_usage`` given a count that is not
    tokens: every call would fail alike): no retry, no bisection; the
    run stops with ``fatal_message`` (partial result kept).

``retry_on(exc)`` overrides: True (retry as transient), False (a row error), None (default).
Errors of httpx, aiohttp and the openai SDK are recognized by status, body and class name
(none of them is imported). The server's hints (``RateHints``) come from ``exc.retry_after``
and the headers of the error's response.

Examples
--------
>>> from dfbatch.execute._retry import classify, backoff
>>> from dfbatch.errors import RetryableError
>>> d = classify(RetryableError("busy", retry_after=2.0))
>>> d.retry, d.retry_after, d.kind
(True, 2.0, 'transient')
>>> classify(ValueError("bad input")).kind
'row'
>>> import random
>>> 2.0 <= backoff(1, base=0.5, cap=60.0, retry_after=2.0, rng=random.Random(0)) <= 2.5
True
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dfbatch.errors import ConfigError, FatalError, NoProgressError, OutputError, RetryableError
from dfbatch.execute._headers import NO_HINTS, RateHints, join_fields, parse_headers

Kind = Literal["row", "transient", "rate_limited", "fatal_run"]

_CONNECTION_ERRORS = frozenset(
    {
        "APIConnectionError",
        "APITimeoutError",
        "TransportError",
        "NetworkError",
        "TimeoutException",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "WriteTimeout",
        "PoolTimeout",
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
    }
)
_TIMEOUT_ERRORS = frozenset({"APITimeoutError", "TimeoutException", "ConnectTimeout",
                             "ReadTimeout", "WriteTimeout", "PoolTimeout", "ServerTimeoutError"})
_RETRY_STATUS = frozenset({408, 409, 429})
_QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "quota_exceeded",
                "billing_not_active")
# OpenAI's words for an account out of quota, which a gateway (LiteLLM) forwards without its
# code; Gemini says them of a per-minute limit too, but with a wait ("retry in", retryDelay)
_QUOTA_WORDS = ("exceeded your current quota",)
_WAIT_WORDS = ("retry in", "retrydelay", "retry_delay", "per minute", "perminute")
_RATE_WORDS = ("rate_limit", "rate limit", "ratelimit", "too many requests")
_OVERLOAD_WORDS = ("overloaded", "server_error", "capacity", "service_unavailable")
_MODEL_CODES = ("model_not_found", "deploymentnotfound", "does not exist", "not_found_error")
_FIXES = {
    "auth": "the API key was refused; check api_key= / OPENAI_API_KEY (or the client you passed)",
    "permission": "the API key may not use this model or resource; check the model name and "
                  "the key's project / permissions",
    "model_not_found": "the model or endpoint does not exist; check the model name and base_url",
    "endpoint": "the server has no such API endpoint (every row is sent there); check "
                "base_url (an OpenAI-compatible one usually ends in /v1) and the endpoint path",
    "quota": "the account is out of quota or credit; check billing, then resume the run "
             "from its checkpoint",
    "no_progress": "no call was answered for outage_timeout seconds; check that the service "
                   "is up and the key's rate limit, then resume the run from its checkpoint "
                   "(or raise outage_timeout=)",
    "long_wait": "the provider asked for a longer wait than outage_timeout before any more "
                 "requests (a daily or account limit?); resume the run from its checkpoint "
                 "after that wait (or raise outage_timeout=)",
    "misuse": "fn called dfbatch with a bad argument (the same on every call); fix the call "
              "the message names, then resume the run from its checkpoint",
}


@dataclass(frozen=True, slots=True)
class Decision:
    """How the pool treats one failed call.

    ``retry``, ``retry_after``, ``rate_limited`` and ``status`` are what older callers read;
    ``kind`` (see the module docstring), ``cause`` (``"auth"``, ``"permission"``,
    ``"model_not_found"``, ``"endpoint"``, ``"quota"``, ``"overload"``, ``"connection"``,
    ``"timeout"``, ``"server"``, ``"rate_limit"``, ``"bad_request"``, ``"output"`` or
    ``None``), ``bisect`` and ``hints`` (every rate-limit header of the answer) are for the
    caller and the limits.
    """

    retry: bool
    retry_after: float | None = None
    rate_limited: bool = False
    status: int | None = None
    kind: Kind = "row"
    cause: str | None = None
    bisect: bool = True
    hints: RateHints = NO_HINTS

    @property
    def overloaded(self) -> bool:
        return self.cause == "overload"

    @property
    def outage(self) -> bool:
        """Does this failure say the service is down (what a circuit breaker counts)? A 5xx
        that says "overloaded" too (a 503 ``server_error``: what a service that is down and
        its gateways answer): the breaker counts it, and the adaptive limit shrinks."""
        return self.kind == "transient" and (
            self.cause in ("connection", "timeout", "server")
            or (self.cause == "overload" and (self.status or 0) >= 500))


def classify(
    exc: BaseException, retry_on: Callable[[BaseException], bool | None] | None = None
) -> Decision:
    """Decide who is at fault for ``exc``, whether to retry, and the server's hints."""
    decision = _default(exc)
    if retry_on is not None:
        verdict = retry_on(exc)
        if verdict is not None and bool(verdict) != decision.retry:
            kind: Kind = "transient" if verdict else "row"
            return dataclasses.replace(
                decision, retry=bool(verdict), kind=kind, bisect=not verdict,
                retry_after=decision.hints.retry_after if verdict else None,
                rate_limited=decision.rate_limited and bool(verdict),
            )
    return decision


def _default(exc: BaseException) -> Decision:
    status = status_code(exc)
    hints = _hints(exc)
    hint = hints.retry_after

    def make(kind: Kind, cause: str | None, *, bisect: bool = False) -> Decision:
        retry = kind in ("transient", "rate_limited")
        return Decision(retry, hint if retry else None, kind == "rate_limited", status, kind,
                        cause, bisect, hints)

    if isinstance(exc, NoProgressError):
        return make("fatal_run", "long_wait" if exc.cause == "retry_after" else "no_progress")
    if isinstance(exc, ConfigError):  # dfbatch's own API misused inside fn: every call would
        return make("fatal_run", "misuse")  # fail (and be paid for) the same way
    if isinstance(exc, RetryableError):
        return make("rate_limited" if _says_rate(exc) else "transient", None)
    if isinstance(exc, OutputError):
        return make("row", "output")
    if isinstance(exc, FatalError):
        return make("row", None, bisect=True)
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, TimeoutError) or names & _TIMEOUT_ERRORS:
        return make("transient", "timeout")
    if isinstance(exc, ConnectionError) or names & _CONNECTION_ERRORS:
        return make("transient", "connection")
    if status is None:
        return make("row", None, bisect=True)
    return _by_status(exc, status, make, waits=hint is not None)


def _by_status(exc: BaseException, status: int, make: Callable[..., Decision], *,
               waits: bool) -> Decision:
    blob = _blob(exc)
    if any(q in blob for q in _QUOTA_CODES) and status in (402, 403, 429):
        return make("fatal_run", "quota")
    if status == 429 and not waits and any(q in blob for q in _QUOTA_WORDS) and not any(
            w in blob for w in _WAIT_WORDS):  # (no wait said: no window to sit out)
        return make("fatal_run", "quota")
    if status == 401:
        return make("fatal_run", "auth")
    if status == 402:
        return make("fatal_run", "quota")
    if status == 403:
        return make("fatal_run", "permission")
    if status == 404 and (any(c in blob for c in _MODEL_CODES) or "model" in blob):
        return make("fatal_run", "model_not_found")
    if status in (404, 405) and _api_endpoint(exc):  # the URL every row is sent to is wrong
        return make("fatal_run", "endpoint")
    if status == 429:
        if "request too large" in blob:  # one request over the whole limit: waiting won't help
            return make("row", "bad_request", bisect=True)
        if not any(r in blob for r in _RATE_WORDS) and any(w in blob for w in _OVERLOAD_WORDS):
            return make("transient", "overload")
        return make("rate_limited", "rate_limit")
    if status in (503, 529) and any(w in blob for w in _OVERLOAD_WORDS):
        return make("transient", "overload")
    if status >= 500:
        return make("transient", "server")
    if status == 408:  # a gateway's (LiteLLM's) word that the upstream did not answer in time
        return make("transient", "timeout")
    if status in _RETRY_STATUS:
        return make("transient", None)
    return make("row", "bad_request", bisect=True)


@dataclass(slots=True)
class AttemptBudget:
    """One batch's budget of tries: errors use up ``max_attempts``; rate-limit 429s use only
    time (``patience_s`` since the batch's first one), so rows do not fail while a provider's
    window is simply not over.

    >>> from dfbatch.execute._retry import AttemptBudget, Decision
    >>> budget = AttemptBudget(max_attempts=2, patience_s=60.0)
    >>> limited = Decision(True, rate_limited=True, kind="rate_limited")
    >>> [budget.may_retry(limited, now=t) for t in (0.0, 30.0, 59.0, 61.0)]
    [True, True, True, False]
    >>> error = Decision(True, kind="transient")
    >>> errors = AttemptBudget(max_attempts=2)  # 2 tries in all: one retry
    >>> errors.may_retry(error, now=0.0), errors.may_retry(error, now=0.0)
    (True, False)
    """

    max_attempts: int
    patience_s: float = 600.0
    failed_tries: int = 0
    first_limited: float | None = None

    def may_retry(self, decision: Decision, *, now: float) -> bool:
        """Record one failed try; may the batch be tried again?"""
        if not decision.retry:
            return False
        if decision.kind == "rate_limited":
            if self.first_limited is None:
                self.first_limited = now
            return now - self.first_limited < self.patience_s
        self.failed_tries += 1
        return self.failed_tries < self.max_attempts


def fatal_message(exc: BaseException, decision: Decision | None = None) -> str:
    """The run-stopping error for a ``fatal_run`` failure: the cause, the fix and the server's
    own words.

    >>> class E(Exception):
    ...     status_code = 401
    >>> fatal_message(E("Incorrect API key provided"))
    'run stopped: the API key was refused; check api_key= / OPENAI_API_KEY (or the client you \
passed) (HTTP 401: E: Incorrect API key provided)'
    """
    decision = decision or classify(exc)
    fix = _FIXES.get(decision.cause or "", "an error that no retry can fix")
    status = f"HTTP {decision.status}: " if decision.status is not None else ""
    return f"run stopped: {fix} ({status}{describe(exc)})"


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an error from httpx, openai, aiohttp or a user error, if any."""
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) else None


def header_items(headers: Any, *, what: str | None = None) -> dict[str, str]:
    """Headers as a ``{name: value}`` dict of ``str``: from a mapping (``dict``,
    ``httpx.Headers``, aiohttp's ``CIMultiDict`` ...) or a sequence of ``(name, value)`` pairs
    (``http.client``'s ``getheaders()``, raw ASGI headers), names and values ``str`` or
    ``bytes``. Anything else: ``{}``, or under ``what`` (the argument's name) a
    ``ConfigError``.

    >>> header_items([(b"Retry-After", b"2")]), header_items({"retry-after": 3})
    ({'Retry-After': '2'}, {'retry-after': '3'})
    """
    if headers is None:
        return {}
    items = getattr(headers, "items", None)
    pairs: Any = headers
    if items is not None:
        try:
            pairs = items()
        except TypeError:
            pairs = None
    out: dict[str, str] = {}
    if pairs is not None and not isinstance(pairs, (str, bytes)):
        try:
            out = join_fields(pairs)
        except (TypeError, ValueError):
            out = {}
        else:
            return out
    if what is not None:
        msg = (f"{what} takes the answer's headers: a mapping (a dict, httpx.Headers ...) or "
               f"a list of (name, value) pairs, got {type(headers).__name__} {headers!r:.60}; "
               "pass response.headers")
        raise ConfigError(msg)
    return out


def _hints(exc: BaseException) -> RateHints:
    headers = getattr(exc, "headers", None)
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    hints = parse_headers(header_items(headers)) if headers is not None else NO_HINTS
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        hints = dataclasses.replace(hints, retry_after=float(value))
    return hints


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, from ``exc.retry_after`` or response headers."""
    return _hints(exc).retry_after


def parse_retry_after(headers: Mapping[str, Any]) -> float | None:
    """The retry hint of a header mapping, in any spelling (see ``_headers``).

    >>> parse_retry_after({"retry-after-ms": "1500"}), parse_retry_after({"Retry-After": "3"})
    (1.5, 3.0)
    """
    return parse_headers(headers).retry_after


def backoff(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: full jitter in [0, min(cap, base*2^(n-1))].

    A server hint is a floor: the wait is ``retry_after`` plus a small jitter (so clients that
    were told the same instant do not return together).
    """
    draw = (rng or random.Random()).uniform
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    if retry_after is not None:
        return retry_after + draw(0, min(ceiling, max(0.05, 0.25 * retry_after)))
    return draw(0, ceiling)


def describe(exc: BaseException) -> str:
    """A one-line error value for the result frame: ``"Type: message"`` (no traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) and not text:
        text = "call timed out"
    return f"{name}: {text}"[:2000] if text else name


def _blob(exc: BaseException) -> str:
    """Everything an error says about itself (code, type, body, message), lower case."""
    parts = [str(getattr(exc, "code", "") or ""), str(getattr(exc, "type", "") or "")]
    body = getattr(exc, "body", None)
    if body is not None:
        parts.append(str(body))
    parts.append(str(exc))
    return " ".join(parts).lower()


# the paths of the model APIs' endpoints: no row's data is in them, so a 404 / 405 there is
# a wrong base_url or path (the same for every row), not a missing resource of one row
_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages",
              "/moderations", "/rerank", "/generate", ":generatecontent", ":embedcontent")


def _api_endpoint(exc: BaseException) -> bool:
    """Was ``exc`` the answer to a request to a model API endpoint (``/chat/completions`` ...,
    from the request of the error or of its response: openai, httpx, aiohttp)?"""
    request = getattr(exc, "request", None) or getattr(
        getattr(exc, "response", None), "request", None)
    url = getattr(request, "url", None) or getattr(getattr(exc, "request_info", None),
                                                   "url", None)
    path = getattr(url, "path", None)
    if not isinstance(path, str):
        return False
    return path.rstrip("/").lower().endswith(_ENDPOINTS)


def _says_rate(exc: BaseException) -> bool:
    return "rate" in str(exc).lower() and "limit" in str(exc).lower()
