"""What a provider's headers say about its rate limits: the whole family, not one spelling.

Pure functions. Understood (case-insensitive):

- ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, also with a scope infix
  (``x-ratelimit-api_key-remaining-requests`` from LiteLLM, any ``x-ratelimit-<scope>-…``);
  when several scopes answer, the tightest one (smallest ``remaining`` / ``limit``) counts;
- reset values as Go-style durations (``1s``, ``120ms``, ``6m0s``, ``1h2m3.5s``), plain seconds,
  or a Unix timestamp;
- ``retry-after-ms`` (milliseconds), ``retry-after`` (seconds or an HTTP date) and LiteLLM's
  ``llm_provider-retry-after`` / ``llm_provider-retry-after-ms`` (the upstream's hints, which
  the proxy forwards with that prefix; the one in seconds is rounded up: ``1`` for 0.3 s);
- the IETF draft's fields (draft-ietf-httpapi-ratelimit-headers), every revision in use:
  ``RateLimit-Policy: "name";q=100;w=60`` with ``RateLimit: "name";r=50;t=30`` (current),
  ``RateLimit: limit=100, remaining=50, reset=30`` (draft 07), and the older trio
  ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` beside
  ``RateLimit-Policy: 10;w=1, 50;w=60`` (Kong, express-rate-limit, many gateways). Quota
  units other than requests (``qu="content-bytes"``) are skipped; ``qu="tokens"`` is read
  as tokens;
- Kong's ``X-RateLimit-{Limit,Remaining}-{Second,Minute,Hour,Day,Month,Year}``;
- Anthropic's ``anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}``
  (per minute; the reset an RFC 3339 time): the token ceiling is the tighter of the combined
  and the input bucket (dfbatch's TPM charge is prompt + ``max_tokens``; output is not paced);
- Cerebras' ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}-{minute,day,…}``.

A repeated field (in any letter case) counts by its most careful value. A request limit whose
``reset`` is over a minute is not per minute (Groq sends its requests *per day* under
OpenAI's names) and is not paced. Nothing here raises: a malformed header is no hint.

A stated limit becomes a per-minute rate only when its window is at most a minute
(``10;w=1`` is 600 a minute): an hourly or daily quota is not a pace to keep; its
``remaining`` still counts.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_FAMILY = re.compile(
    r"^x-ratelimit-(?:(?P<scope>.+?)-)?(?P<what>limit|remaining|reset)-(?P<kind>requests|tokens)$"
)
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
_DATE = re.compile(r"^\d{4}-\d\d-\d\d[t ]")  # RFC 3339 (or ISO 8601 with a space)
_DICT = re.compile(r"(?:^|,)\s*(?:limit|remaining|reset)\s*=", re.IGNORECASE)
_LONGEST = 64  # characters of a duration or a number: anything longer is junk
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
           "h": 3600.0}
_KONG = re.compile(
    r"^x-ratelimit-(?P<what>limit|remaining)-(?P<period>second|minute|hour|day|month|year)$"
)
_ANTHROPIC = re.compile(  # (input-tokens: a bucket of its own, below the combined tokens)
    r"^anthropic-ratelimit-(?P<kind>requests|tokens|input-tokens)-(?P<what>limit|remaining|reset)$"
)
_PERIODIC = re.compile(  # Cerebras: x-ratelimit-limit-tokens-minute, …-requests-day
    r"^x-ratelimit-(?P<what>limit|remaining|reset)-(?P<kind>requests|tokens)"
    r"-(?P<period>second|minute|hour|day)$"
)
_PERIOD_S = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0,
             "month": 2_592_000.0, "year": 31_536_000.0}
_IETF = ("ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining",
         "ratelimit-reset")
_PACE_MAX_S = 60.0  # a window longer than this is a quota, not a rate to pace at
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
    window_requests: float | None = None  # seconds of the fixed window the limit is counted in
    window_tokens: float | None = None  # (an IETF policy's w=, Kong's period; None: a bucket)

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)

    def limit(self, tokens: bool) -> float | None:
        return self.limit_tokens if tokens else self.limit_requests

    def remaining(self, tokens: bool) -> float | None:
        return self.remaining_tokens if tokens else self.remaining_requests

    def reset(self, tokens: bool) -> float | None:
        return self.reset_tokens if tokens else self.reset_requests

    def window(self, tokens: bool) -> float | None:
        return self.window_tokens if tokens else self.window_requests


NO_HINTS = RateHints()


def parse_duration(text: Any, *, now: float | None = None) -> float | None:
    """Seconds in a reset value: ``"6m0s"``, ``"120ms"``, ``"2.5"``, a Unix timestamp or an
    RFC 3339 time.

    >>> parse_duration("6m0s"), parse_duration("0.5"), parse_duration("1700000010", now=1.7e9)
    (360.0, 0.5, 10.0)
    >>> parse_duration("1970-01-01T00:00:30Z", now=0.0)
    30.0
    """
    raw = str(text).strip().lower()
    if not raw or len(raw) > _LONGEST:
        return None
    if _DATE.match(raw):  # 2025-08-21T12:40:59Z
        try:
            when = datetime.datetime.fromisoformat(raw.upper())
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
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
    while pos < len(raw) and (match := _PART.match(raw, pos)) is not None:
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(raw) and math.isfinite(total) else None


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
        except (TypeError, ValueError, IndexError, OverflowError):
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
    try:
        return _parse(headers, now)
    except Exception:  # (a provider's header must never break a run: no hint instead)
        return NO_HINTS


def _parse(headers: Any, now: float | None) -> RateHints:
    joined = {k.strip().lower(): v for k, v in join_fields(_items(headers)).items()}
    scopes: dict[str, dict[str, float]] = {}
    hints: dict[str, float] = {}
    ietf: dict[str, str] = {}
    for name, value in joined.items():
        if name in _IETF:
            ietf[name] = value
        elif (m := _KONG.match(name)) is not None:
            number = _each(value, _number, min)
            if number is not None:
                period, what = m.group("period"), m.group("what")
                kong = scopes.setdefault(f"kong:{period}/requests", {})
                if what == "limit":
                    number = _per_minute(number, _PERIOD_S[period])
                    if number is not None:
                        kong["window"] = _PERIOD_S[period]
                if number is not None:
                    kong[what] = number
        elif name in _MS_HINTS:
            ms = _each(value, _number, max)
            if ms is not None:
                hints[name] = ms / 1000.0
        elif name in _HINTS:
            seconds = parse_retry_after(value, now=now)
            if seconds is None:  # (not an HTTP date: a comma there is a repeated header's)
                seconds = _each(value, lambda v: parse_retry_after(v, now=now), max)
            if seconds is not None:
                hints[name] = seconds
        elif (m := _FAMILY.match(name) or _ANTHROPIC.match(name)
              or _PERIODIC.match(name)) is not None:
            what, said = m.group("what"), m.groupdict()
            kind = "tokens" if said["kind"].endswith("tokens") else "requests"
            number = (_each(value, lambda v: parse_duration(v, now=now), max) if what == "reset"
                      else _each(value, _number, min))
            if number is not None and what == "limit" and said.get("period"):
                number = _per_minute(number, _PERIOD_S[said["period"]])
            if number is not None:
                scope = (f"x:{said['scope'] or ''}" if "scope" in said
                         else f"{said['kind']}:{said['period']}" if said.get("period")
                         else f"anthropic:{said['kind']}")
                scopes.setdefault(f"{scope}/{kind}", {})[what] = number
    if ietf:
        _ietf_scopes(ietf, scopes, now)
    if not scopes and not hints:
        return NO_HINTS
    fields: dict[str, float | None] = {}
    for kind in ("requests", "tokens"):
        mine = [s for k, s in scopes.items() if k.endswith("/" + kind)]
        # (a limit under 1 a minute is no provider's: a garbled header would stall the run;
        # a request limit whose bucket refills over more than a minute is not per minute:
        # Groq's x-ratelimit-limit-requests is per day, its reset "2m59.56s")
        paced = [s for s in mine if 1 <= s.get("limit", 0) < math.inf
                 and not (kind == "requests" and s.get("reset", 0) > _PACE_MAX_S)]
        least = min(paced, key=lambda s: s["limit"], default=None)
        fields[f"limit_{kind}"] = least["limit"] if least else None
        fields[f"window_{kind}"] = least.get("window") if least else None
        tight = min((s for s in mine if "remaining" in s), key=lambda s: s["remaining"],
                    default=None)
        fields[f"remaining_{kind}"] = tight["remaining"] if tight else None
        resets = [s["reset"] for s in mine if "reset" in s]
        reset = tight.get("reset") if tight else None
        fields[f"reset_{kind}"] = reset if reset is not None else (max(resets) if resets else None)
    return RateHints(**fields, retry_after=_retry_hint(hints))


def _ietf_scopes(fields: dict[str, str], scopes: dict[str, dict[str, float]],
                 now: float | None) -> None:
    """Add what the IETF draft's fields say (any revision) to ``scopes``; a malformed member
    is skipped, never an error."""
    kinds: dict[str, str | None] = {}  # policy name -> what it counts (None: not paced)
    windows: dict[float, float] = {}  # quota -> window: unnamed (older) policies
    for i, (item, params) in enumerate(_members(fields.get("ratelimit-policy", ""))):
        name = item if _number(item) is None else f"#{i}"
        kind = kinds[name] = _unit(params)
        quota = _number(params.get("q", params.get("l", "" if name != f"#{i}" else item)))
        window = _number(params.get("w", params.get("window", "")))  # (window=: draft 00)
        if kind is None or quota is None:
            continue
        if window is not None:
            windows.setdefault(quota, window)
            limit = _per_minute(quota, window)
            if limit is not None:
                scopes.setdefault(f"ietf:{name}/{kind}", {}).update(limit=limit, window=window)

    def put(scope: str, what: str, value: float | None) -> None:
        if value is not None:
            scopes.setdefault(scope, {})[what] = value

    raw = fields.get("ratelimit", "")
    members = _members(raw)
    if _DICT.search(raw):  # draft 07: a dictionary (no quoted or token name has "=")
        said = [item.split("=", 1) for item, _ in members if "=" in item]
        old = {f"ratelimit-{k.strip().lower()}": v.strip() for k, v in said}
    else:
        for item, params in members:  # (its policy's unit, else its own, else requests)
            kind = kinds[item] if item in kinds else _unit(params)
            if kind is not None:
                put(f"ietf:{item}/{kind}", "remaining", _number(params.get("r", "")))
                put(f"ietf:{item}/{kind}", "reset",
                    parse_duration(params.get("t", ""), now=now) if "t" in params else None)
        old = fields
    limits = _members(old.get("ratelimit-limit", ""))
    if limits:  # the limit now, then (draft 03) the policies: "100, 100;w=60"
        for item, params in limits:
            quota = _number(item)
            window = _number(params.get("w", params.get("window", "")))
            if quota is not None and window is not None:
                windows.setdefault(quota, window)
        quota = _number(limits[0][0])
        window = windows.get(quota) if quota is not None else None
        if quota is not None and window is not None:
            limit = _per_minute(quota, window)
            if limit is not None:
                scopes.setdefault("ietf/requests", {}).update(limit=limit, window=window)
    for what in ("remaining", "reset"):  # (repeated: the least remaining, the latest reset)
        values = [_number(item) if what == "remaining" else parse_duration(item, now=now)
                  for item, _ in _members(old.get(f"ratelimit-{what}", ""))]
        found = [v for v in values if v is not None]
        if found:
            put("ietf/requests", what, min(found) if what == "remaining" else max(found))


def _members(text: str) -> list[tuple[str, dict[str, str]]]:
    """The members of a structured-field list: ``'"a";q=1;w=2, 3'`` ->
    ``[("a", {"q": "1", "w": "2"}), ("3", {})]`` (quotes dropped; commas and semicolons
    inside quotes kept)."""
    out: list[tuple[str, dict[str, str]]] = []
    for member in _split(text, ","):
        item, *params = _split(member, ";")  # ("" for ";q=1": no item, skipped below)
        said: dict[str, str] = {}
        for param in params:
            key, _, value = param.partition("=")
            said[key.strip().lower()] = value.strip().strip('"') if value else "?1"
        out.append((item.strip().strip('"'), said))
    return [(item, params) for item, params in out if item]


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double quotes; empty list members dropped."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in str(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    stripped = [p.strip() for p in parts]
    return [p for p in stripped if p] if sep == "," else stripped


def _unit(params: dict[str, str]) -> str | None:
    """The quota unit a member counts: requests (the draft's default), tokens, or ``None``
    for a unit dfbatch does not pace (``content-bytes``, ``concurrent-requests``)."""
    unit = params.get("qu", "requests").lower()
    return unit if unit in ("requests", "tokens") else None


def _per_minute(quota: float, window_s: float) -> float | None:
    """``quota`` per ``window_s`` as a rate per minute, for windows up to a minute."""
    if not 0 < window_s <= _PACE_MAX_S:
        return None
    rate = quota * 60.0 / window_s
    return rate if math.isfinite(rate) else None


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
    return {name: value for name, value in join_fields(_items(headers)).items()
            if (low := name.strip().lower()).startswith(("x-ratelimit-", "anthropic-ratelimit-"))
            or low in (*_HINTS, *_MS_HINTS, *_IETF)}


def join_fields(pairs: Iterable[tuple[Any, Any]]) -> dict[str, str]:
    """Header ``(name, value)`` pairs (``str`` or ``bytes``) as a dict of text; a field
    repeated in any letter case (aiohttp's multidict, raw pairs) has its values joined with
    ", " under its first spelling, as ``httpx.Headers`` does.

    >>> join_fields([("Retry-After", b"2"), ("retry-after", "3")])
    {'Retry-After': '2, 3'}
    """
    out: dict[str, str] = {}
    names: dict[str, str] = {}  # lower-case name -> the spelling kept
    for name, value in pairs:
        key, text = header_text(name), header_text(value)
        low = key.lower()
        if low in names:
            out[names[low]] = f"{out[names[low]]}, {text}"
        else:
            names[low] = key
            out[key] = text
    return out


def _items(headers: Any) -> list[tuple[Any, Any]]:
    """The (name, value) pairs of a mapping; anything else, or a malformed pair, is left out."""
    items = getattr(headers, "items", None)
    if items is None:
        return []
    try:
        pairs = list(items())
    except Exception:
        return []
    return [p for p in pairs if isinstance(p, tuple) and len(p) == 2]


def header_text(value: Any) -> str:
    """A header name or value as text (``bytes`` as HTTP's latin-1)."""
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


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
