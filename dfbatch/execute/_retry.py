"""Which errors retry, and how long to wait: full-jitter exponential backoff honoring Retry-After.

Retried: timeouts, connection errors, HTTP 408 / 409 / 429 / 5xx, ``RetryableError``.
Not retried: other 4xx (400, 401, 403, 404, 422 …), quota errors (429 ``insufficient_quota``),
``FatalError`` and any other exception. ``retry_on(exc)`` overrides: True / False, or None for
the default. The server's hint comes from ``exc.retry_after`` or the ``retry-after-ms`` /
``retry-after`` headers of an httpx / openai / aiohttp error.

Examples
--------
>>> from dfbatch.execute._retry import classify, backoff
>>> from dfbatch.errors import RetryableError
>>> d = classify(RetryableError("busy", retry_after=2.0))
>>> d.retry, d.retry_after
(True, 2.0)
>>> classify(ValueError("bad input")).retry
False
>>> import random
>>> 2.0 <= backoff(1, base=0.5, cap=60.0, retry_after=2.0, rng=random.Random(0)) <= 2.5
True
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dfbatch.errors import FatalError, RetryableError

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
        "ServerDisconnectedError",
        "ServerTimeoutError",
    }
)
_RETRY_STATUS = frozenset({408, 409, 429})
_QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "quota_exceeded")


@dataclass(frozen=True, slots=True)
class Decision:
    """How the pool treats one failed call."""

    retry: bool
    retry_after: float | None = None
    rate_limited: bool = False
    status: int | None = None


def classify(
    exc: BaseException, retry_on: Callable[[BaseException], bool | None] | None = None
) -> Decision:
    """Decide whether ``exc`` is worth retrying, and the server's wait hint if any."""
    status = status_code(exc)
    hint = retry_after(exc)
    rate_limited = status == 429 or (isinstance(exc, RetryableError) and _says_rate(exc))
    if retry_on is not None:
        verdict = retry_on(exc)
        if verdict is not None:
            return Decision(bool(verdict), hint, rate_limited, status)
    if isinstance(exc, RetryableError):
        return Decision(True, hint, rate_limited, status)
    if isinstance(exc, FatalError):
        return Decision(False, None, False, status)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return Decision(True, hint, False, status)
    if any(cls.__name__ in _CONNECTION_ERRORS for cls in type(exc).__mro__):
        return Decision(True, hint, False, status)
    if status is None:
        return Decision(False, None, False, None)
    if status == 429 and _is_quota(exc):
        return Decision(False, None, False, status)
    retry = status in _RETRY_STATUS or status >= 500
    return Decision(retry, hint if retry else None, status == 429, status)


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an error from httpx, openai, aiohttp or a user error, if any."""
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) else None


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, from ``exc.retry_after`` or response headers."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    headers = getattr(exc, "headers", None)
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    return parse_retry_after(headers) if headers is not None else None


def parse_retry_after(headers: Mapping[str, Any]) -> float | None:
    """Parse ``retry-after-ms`` (ms) or ``retry-after`` (seconds or an HTTP date).

    >>> parse_retry_after({"retry-after-ms": "1500"}), parse_retry_after({"Retry-After": "3"})
    (1.5, 3.0)
    """
    lower = {str(k).lower(): v for k, v in dict(headers).items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        if "retry-after" in lower:
            raw = str(lower["retry-after"])
            try:
                return max(0.0, float(raw))
            except ValueError:
                when = email.utils.parsedate_to_datetime(raw)
                return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None
    return None


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
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not text:
        text = "call timed out"
    return f"{name}: {text}"[:2000] if text else name


def _is_quota(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    blob = f"{code} {body} {exc}".lower()
    return any(q in blob for q in _QUOTA_CODES)


def _says_rate(exc: BaseException) -> bool:
    return "rate" in str(exc).lower() and "limit" in str(exc).lower()
