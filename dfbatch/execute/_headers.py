"""What a provider's headers say about its rate limits: the whole family, not one spelling.

Pure functions. Understood (case-insensitive):

- ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, also with a scope infix
  (``x-ratelimit-api_key-remaining-requests`` from LiteLLM, any ``x-ratelimit-<scope>-…``);
  when several scopes answer, the tightest one (smallest ``remaining`` / ``limit``) counts;
- reset values as Go-style durations (``1s``, ``120ms``, ``6m0s``, ``1h2m3.5s``), plain seconds,
  or a Unix timestamp;
- ``retry-after-ms`` (milliseconds), ``retry-after`` (seconds or an HTTP date) and LiteLLM's
  ``llm_provider-retry-after`` / ``llm_provider-retry-after-ms`` (the upstream's hints, which
  the proxy forwards with that prefix; the one in seconds is rounded up: ``1`` for 0.3 s).

Examples
--------
>>> from dfbatch.execute._headers import parse_headers, parse_duration
>>> h = parse_headers({"X-RateLimit-api_key-Remaining-Requests": "7",
...                    "x-ratelimit-limit-tokens": "150000", "x-ratelimit-reset-tokens": "6m0s",
...                    "llm_provider-retry-after": "60"})
>>> h.remaining_requests, h.limit_tokens, h.reset_tokens, h.retry_after
(7.0, 150000.0, 360.0, 60.0)
>>> parse_duration("1h2m3.5s"), parse_duration("120ms"), parse_duration("bogus")
(3723.5, 0.12, None)
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_FAMILY = re.compile(
    r"^x-ratelimit-(?:(?P<scope>.+?)-)?(?P<what>limit|remaining|reset)-(?P<kind>requests|tokens)$"
)
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
           "h": 3600.0}
_EPOCH = 1e9  # a bare number this large is a Unix timestamp, not a duration
_HINTS = ("retry-after", "llm_provider-retry-after")
_MS_HINTS = ("retry-after-ms", "llm_provider-retry-after-ms")  # precise versions of _HINTS


@dataclass(frozen=True, slots=True)
class RateHints:
    """The rate-limit facts in one answer's headers (``None``: not said).

    ``limit_*`` are per minute; ``remaining_*`` what the provider's bucket holds now;
    ``reset_*`` seconds until it is full again; ``retry_after`` seconds to wait before sending.
    """

    limit_requests: float | None = None
    limit_tokens: float | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    retry_after: float | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)

    def limit(self, tokens: bool) -> float | None:
        return self.limit_tokens if tokens else self.limit_requests

    def remaining(self, tokens: bool) -> float | None:
        return self.remaining_tokens if tokens else self.remaining_requests

    def reset(self, tokens: bool) -> float | None:
        return self.reset_tokens if tokens else self.reset_requests


NO_HINTS = RateHints()


def parse_duration(text: Any, *, now: float | None = None) -> float | None:
    """Seconds in a reset value: ``"6m0s"``, ``"120ms"``, ``"2.5"`` or a Unix timestamp.

    >>> parse_duration("6m0s"), parse_duration("0.5"), parse_duration("1700000010", now=1.7e9)
    (360.0, 0.5, 10.0)
    """
    raw = str(text).strip().lower()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            return None
        if value >= _EPOCH:
            return max(0.0, value - (time.time() if now is None else now))
        return value
    pos, total = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(raw) and pos > 0 else None


def parse_retry_after(value: Any, *, now: float | None = None) -> float | None:
    """Seconds in a ``retry-after`` value: a number of seconds or an HTTP date.

    >>> parse_retry_after("3"), parse_retry_after("Thu, 01 Jan 1970 00:00:05 GMT", now=0.0)
    (3.0, 5.0)
    """
    raw = str(value).strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # ("-0000": UTC, the zone not said; never local time)
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return max(0.0, seconds) if math.isfinite(seconds) else None


def parse_headers(headers: Mapping[str, Any] | Any, *, now: float | None = None) -> RateHints:
    """The ``RateHints`` in a header mapping (a dict, ``httpx.Headers``, aiohttp's …); ``None``
    or a mapping without rate-limit headers gives ``NO_HINTS``."""
    if headers is None:
        return NO_HINTS
    scopes: dict[str, dict[str, float]] = {}
    hints: dict[str, float] = {}
    for key, value in _items(headers):
        name = str(key).strip().lower()
        if name in _MS_HINTS:
            ms = _each(value, _number, max)
            if ms is not None:
                hints[name] = ms / 1000.0
        elif name in _HINTS:
            seconds = parse_retry_after(value, now=now)
            if seconds is None:  # (not an HTTP date: a comma there is a repeated header's)
                seconds = _each(value, lambda v: parse_retry_after(v, now=now), max)
            if seconds is not None:
                hints[name] = seconds
        elif (m := _FAMILY.match(name)) is not None:
            what, kind = m.group("what"), m.group("kind")
            number = (_each(value, lambda v: parse_duration(v, now=now), max) if what == "reset"
                      else _each(value, _number, min))
            if number is not None:
                scopes.setdefault(f"{m.group('scope')}/{kind}", {})[what] = number
    if not scopes and not hints:
        return NO_HINTS
    fields: dict[str, float | None] = {}
    for kind in ("requests", "tokens"):
        mine = [s for k, s in scopes.items() if k.endswith("/" + kind)]
        # (a limit under 1 a minute is no provider's: a garbled header would stall the run)
        limits = [s["limit"] for s in mine if s.get("limit", 0) >= 1]
        fields[f"limit_{kind}"] = min(limits) if limits else None
        tight = min((s for s in mine if "remaining" in s), key=lambda s: s["remaining"],
                    default=None)
        fields[f"remaining_{kind}"] = tight["remaining"] if tight else None
        resets = [s["reset"] for s in mine if "reset" in s]
        reset = tight.get("reset") if tight else None
        fields[f"reset_{kind}"] = reset if reset is not None else (max(resets) if resets else None)
    return RateHints(**fields, retry_after=_retry_hint(hints))


def _retry_hint(hints: dict[str, float]) -> float | None:
    """``retry-after-ms`` is the precise one; else the longest of the other hints, each
    ``llm_provider-…`` one in milliseconds when the proxy forwarded that too."""
    if "retry-after-ms" in hints:
        return hints["retry-after-ms"]
    upstream = hints.get("llm_provider-retry-after-ms", hints.get("llm_provider-retry-after"))
    others = [v for v in (hints.get("retry-after"), upstream) if v is not None]
    return max(others) if others else None


def rate_headers(headers: Mapping[str, Any] | Any) -> dict[str, str]:
    """Only the rate-limit headers of ``headers`` (what an adapter passes on to the run).

    >>> rate_headers({"content-type": "json", "X-RateLimit-Remaining-Requests": "3"})
    {'X-RateLimit-Remaining-Requests': '3'}
    """
    if headers is None:
        return {}
    out = {}
    for key, value in _items(headers):
        name = str(key).lower()
        if name.startswith("x-ratelimit-") or name in (*_HINTS, *_MS_HINTS):
            out[str(key)] = str(value)
    return out


def _items(headers: Any) -> list[tuple[Any, Any]]:
    items = getattr(headers, "items", None)
    if items is None:
        return []
    try:
        return list(items())
    except TypeError:
        return []


def _each(value: Any, parse: Callable[[Any], float | None],
          pick: Callable[[list[float]], float]) -> float | None:
    """``value`` parsed, or, when a header came twice (``httpx.Headers`` and aiohttp join the
    values with commas: ``"2, 3"``), the most careful of its parts (``pick``: the longest
    wait, the smallest limit)."""
    text = str(value)
    if "," not in text:
        return parse(text)
    parts = [parse(part) for part in text.split(",") if part.strip()]
    found = [p for p in parts if p is not None]
    return pick(found) if found and len(found) == len(parts) else None


def _number(value: Any) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
