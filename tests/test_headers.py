"""The rate-limit header family: every spelling providers and gateways use (pure functions)."""

from __future__ import annotations

import httpx
import pytest

from dfbatch.execute._headers import (
    NO_HINTS,
    RateHints,
    parse_duration,
    parse_headers,
    parse_retry_after,
    rate_headers,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("120ms", 0.12),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("20", 20.0),
        ("0.25", 0.25),
        ("17ms", 0.017),
        ("1m30s", 90.0),
        ("250us", 0.00025),
        (" 2S ", 2.0),
        ("1700000030", 30.0),  # a Unix timestamp (now = 1.7e9)
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text, now=1.7e9) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "-3", "1s junk", "nan", "inf"])
def test_bad_durations_are_none(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), ("0", 0.0), ("2.5", 2.5), ("-1", 0.0),
     ("Thu, 01 Jan 1970 00:01:00 GMT", 60.0), ("whenever", None),
     ("Thu, 01 Jan 1970 00:01:00 -0000", 60.0)],  # (UTC, not the machine's local time)
)
def test_retry_after_values(value, seconds):
    assert parse_retry_after(value, now=0.0) == seconds


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (  # OpenAI
            {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599",
             "x-ratelimit-reset-requests": "100ms", "x-ratelimit-limit-tokens": "150000",
             "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "6m0s"},
            RateHints(600, 150000, 599, 149000, 0.1, 360.0),
        ),
        (  # case does not matter
            {"X-RateLimit-Limit-Requests": "10", "Retry-After": "2"},
            RateHints(limit_requests=10, retry_after=2.0),
        ),
        (  # LiteLLM's per-key scope, and its router's only hint
            {"x-ratelimit-api_key-limit-requests": "150",
             "x-ratelimit-api_key-remaining-requests": "3",
             "x-ratelimit-api_key-remaining-tokens": "900",
             "llm_provider-retry-after": "60"},
            RateHints(limit_requests=150, remaining_requests=3, remaining_tokens=900,
                      retry_after=60.0),
        ),
        (  # several scopes: the tightest one counts, with its own reset
            {"x-ratelimit-remaining-requests": "100", "x-ratelimit-reset-requests": "1s",
             "x-ratelimit-org-remaining-requests": "5", "x-ratelimit-org-reset-requests": "30s",
             "x-ratelimit-limit-requests": "600", "x-ratelimit-org-limit-requests": "300"},
            RateHints(limit_requests=300, remaining_requests=5, reset_requests=30.0),
        ),
        (  # retry-after-ms is the precise hint
            {"retry-after": "1", "retry-after-ms": "250"},
            RateHints(retry_after=0.25),
        ),
        (  # without it, the longest hint
            {"retry-after": "1", "llm_provider-retry-after": "60"},
            RateHints(retry_after=60.0),
        ),
        (  # a LiteLLM proxy forwarding the upstream's 429 (1.108.7): its seconds rounded up
            {"llm_provider-retry-after": "1", "llm_provider-retry-after-ms": "307",
             "x-ratelimit-remaining-requests": "0"},
            RateHints(remaining_requests=0, retry_after=0.307),
        ),
        (  # ... and the proxy's own hint, when longer, still holds
            {"retry-after": "60", "llm_provider-retry-after-ms": "307"},
            RateHints(retry_after=60.0),
        ),
        ({"retry-after": "Thu, 01 Jan 1970 00:00:07 GMT"}, RateHints(retry_after=7.0)),
        (  # junk values are ignored, not fatal
            {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-tokens": "later",
             "retry-after": "soon", "retry-after-ms": "x"},
            NO_HINTS,
        ),
        ({"content-type": "application/json", "x-ratelimit-remaining-requests-week": "5"},
         NO_HINTS),
        (None, NO_HINTS),
    ],
    ids=["openai", "case", "litellm", "scopes", "ms", "longest", "proxy-ms", "proxy-own",
         "http-date", "junk", "other", "none"],
)
def test_parse_headers(headers, expected):
    assert parse_headers(headers, now=0.0) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (  # the current draft: named policies, a day's quota is not a pace
            {"RateLimit-Policy": '"burst";q=100;w=60, "day";q=5000;w=86400',
             "RateLimit": '"burst";r=50;t=30, "day";r=4000;t=3600'},
            RateHints(limit_requests=100, remaining_requests=50, reset_requests=30,
                      window_requests=60),
        ),
        (  # per second: 10 per 1 s is 600 a minute
            {"ratelimit-policy": '"s";q=10;w=1', "ratelimit": '"s";r=2;t=0.4'},
            RateHints(limit_requests=600, remaining_requests=2, reset_requests=0.4,
                      window_requests=1),
        ),
        (  # quota units: tokens read as tokens, bytes not paced at all
            {"RateLimit-Policy": '"t";q=9000;w=60;qu="tokens", "b";q=1;w=1;qu="content-bytes"',
             "RateLimit": '"t";r=100;t=2, "b";r=0;t=1'},
            RateHints(limit_tokens=9000, remaining_tokens=100, reset_tokens=2, window_tokens=60),
        ),
        (  # draft 07: a dictionary, windows from unnamed policies
            {"RateLimit": "limit=10, remaining=3, reset=4", "RateLimit-Policy": "10;w=1, 50;w=60"},
            RateHints(limit_requests=50, remaining_requests=3, reset_requests=4,
                      window_requests=60),
        ),
        (  # the older trio, the window in the limit itself (draft 03)
            {"RateLimit-Limit": "100, 100;w=60", "RateLimit-Remaining": "7",
             "RateLimit-Reset": "1700000012"},
            RateHints(limit_requests=100, remaining_requests=7, reset_requests=12,
                      window_requests=60),
        ),
        (  # the trio with no window anywhere: no pace, still a remaining count
            {"RateLimit-Limit": "100", "RateLimit-Remaining": "7", "RateLimit-Reset": "5"},
            RateHints(remaining_requests=7, reset_requests=5),
        ),
        (  # Kong: per-period limits, the tightest pace and remaining count
            {"X-RateLimit-Limit-Second": "5", "X-RateLimit-Remaining-Second": "4",
             "X-RateLimit-Limit-Minute": "100", "X-RateLimit-Remaining-Minute": "90",
             "X-RateLimit-Limit-Hour": "1000", "RateLimit-Reset": "1"},
            RateHints(limit_requests=100, remaining_requests=4, reset_requests=1,
                      window_requests=60),
        ),
        (  # junk in every member: nothing learned, nothing raised
            {"RateLimit-Policy": '"x";q=nan;w=inf, ;;, "y"', "RateLimit": '"x";r=-1;t=soon, ,,',
             "RateLimit-Limit": "many", "X-RateLimit-Limit-Minute": "-3"},
            NO_HINTS,
        ),
        (  # quotes hide separators
            {"RateLimit-Policy": '"a;b,c";q=4;w=2', "RateLimit": '"a;b,c";r=1;t=1'},
            RateHints(limit_requests=120, remaining_requests=1, reset_requests=1,
                      window_requests=2),
        ),
    ],
    ids=["named", "per-second", "units", "draft07", "trio-w", "trio", "kong", "junk", "quoted"],
)
def test_ietf_and_kong_fields(headers, expected):
    assert parse_headers(headers, now=1.7e9) == expected


def test_cerebras_periods_and_groq_daily_requests():
    cerebras = parse_headers({"x-ratelimit-limit-requests-day": "14400",
                              "x-ratelimit-remaining-requests-day": "14000",
                              "x-ratelimit-limit-tokens-minute": "60000",
                              "x-ratelimit-remaining-tokens-minute": "59000",
                              "x-ratelimit-reset-tokens-minute": "33.5"})
    assert cerebras == RateHints(limit_tokens=60000, remaining_requests=14000,
                                 remaining_tokens=59000, reset_tokens=33.5)
    # Groq: the OpenAI names, but requests per *day* (its reset gives it away); tokens per minute
    groq = parse_headers({"x-ratelimit-limit-requests": "14400",
                          "x-ratelimit-remaining-requests": "14370",
                          "x-ratelimit-reset-requests": "2m59.56s",
                          "x-ratelimit-limit-tokens": "6000",
                          "x-ratelimit-reset-tokens": "7.66s"})
    assert (groq.limit_requests, groq.limit_tokens) == (None, 6000)


def test_hostile_values_never_raise_nor_pace_wrongly():
    huge = {"Retry-After": "Thu, 01 Jan 99999999999 00:00:00 GMT",  # OverflowError once
            "RateLimit-Policy": '"a";q=1e308;w=1, "b";q=5;w=1e-320',  # inf a minute once
            "X-RateLimit-Limit-Second": "1e307"}
    assert parse_headers(huge) == NO_HINTS
    slow = "1" * 100_000 + "x"  # (the duration regex was quadratic: 248 s)
    assert parse_headers({"x-ratelimit-reset-requests": slow, "RateLimit-Reset": slow}) == NO_HINTS

    class Triples:
        def items(self) -> list[tuple[str, str, str]]:
            return [("retry-after", "1", "x")]

    assert parse_headers(Triples()) == NO_HINTS and rate_headers(Triples()) == {}


def test_repeated_fields_in_any_case_the_most_careful_counts():
    # aiohttp's multidict gives a repeated field twice; a plain dict may hold two spellings
    class Multi:
        def items(self) -> list[tuple[str, str]]:
            return [("RateLimit-Policy", '"s";q=5;w=1'), ("RateLimit-Policy", '"m";q=1000;w=60'),
                    ("X-RateLimit-Limit-Requests", "10"), ("x-ratelimit-limit-requests", "1000"),
                    ("RateLimit-Remaining", "50"), ("ratelimit-remaining", "3")]

    hints = parse_headers(Multi())
    assert (hints.limit_requests, hints.remaining_requests) == (10, 3)
    assert rate_headers(Multi())["RateLimit-Policy"] == '"s";q=5;w=1, "m";q=1000;w=60'
    from dfbatch.execute._retry import header_items  # (what a fn's report(headers=) takes)

    assert parse_headers(header_items(Multi())) == hints
    assert parse_headers(header_items(list(Multi().items()))) == hints


def test_ietf_corners():
    said = parse_headers({"RateLimit-Policy": '"a=b";q=10;w=1', "RateLimit": '"a=b";r=1;t=1'})
    assert (said.limit_requests, said.remaining_requests) == (600, 1)  # not draft 07
    said = parse_headers({"RateLimit": "limit=10, remaining=3, reset=4, foo"})
    assert said.remaining_requests == 3  # draft 07 with a stray member
    said = parse_headers({"RateLimit-Policy": r'"x\"y";q=5;w=1', "RateLimit": r'"x\"y";r=2;t=1'})
    assert (said.limit_requests, said.remaining_requests) == (300, 2)  # an escaped quote
    said = parse_headers({"RateLimit-Limit": "5, 5;window=1"})  # draft 00's parameter name
    assert said.limit_requests == 300
    said = parse_headers({"RateLimit": '"t";r=900;t=1;qu="tokens"'})  # its own unit
    assert (said.remaining_tokens, said.remaining_requests) == (900, None)
    assert parse_duration("2023-11-14 22:13:21+00:00", now=1.7e9) == 1.0


def test_anthropic_headers():
    hints = parse_headers({
        "anthropic-ratelimit-requests-limit": "1000",
        "anthropic-ratelimit-requests-remaining": "999",
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:21Z",  # 1 s after now
        "anthropic-ratelimit-tokens-limit": "96000",
        "anthropic-ratelimit-tokens-remaining": "95000",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:22.5+00:00",
        "anthropic-ratelimit-input-tokens-limit": "80000",
        "anthropic-ratelimit-output-tokens-limit": "16000",
        "retry-after": "3",
    }, now=1.7e9)
    # the token ceiling: the tighter of the combined and the input bucket (output not paced)
    assert hints == RateHints(1000, 80000, 999, 95000, pytest.approx(1.0), pytest.approx(2.5), 3)
    assert set(rate_headers({"anthropic-ratelimit-requests-limit": "1", "x": "y"})) == {
        "anthropic-ratelimit-requests-limit"}
    assert parse_duration("2023-13-45T99:00:00Z") is None


def test_ietf_fields_beside_openai_ones_the_tightest_counts():
    hints = parse_headers({"x-ratelimit-limit-requests": "600",
                           "x-ratelimit-remaining-requests": "500",
                           "RateLimit-Policy": '"g";q=5;w=1', "RateLimit": '"g";r=1;t=0.2'})
    assert (hints.limit_requests, hints.remaining_requests, hints.reset_requests) == (300, 1, 0.2)
    kept = rate_headers(httpx.Headers({"RateLimit": "x", "RateLimit-Policy": "y", "Server": "z"}))
    assert set(kept) == {"ratelimit", "ratelimit-policy"}


def test_httpx_headers_and_accessors():
    headers = httpx.Headers([("X-RateLimit-Remaining-Tokens", "42"),
                             ("x-ratelimit-limit-tokens", "1000")])
    hints = parse_headers(headers)
    assert (hints.remaining(tokens=True), hints.limit(tokens=True)) == (42.0, 1000.0)
    assert hints.remaining(tokens=False) is None and hints.reset(tokens=True) is None
    assert not hints.empty and NO_HINTS.empty


def test_rate_headers_keeps_only_the_family():
    raw = {"Content-Type": "json", "x-ratelimit-api_key-remaining-requests": "1",
           "llm_provider-retry-after": "60", "retry-after-ms": "5", "server": "x",
           "llm_provider-retry-after-ms": "307", "llm_provider-content-type": "json"}
    assert set(rate_headers(raw)) == {"x-ratelimit-api_key-remaining-requests",
                                      "llm_provider-retry-after", "retry-after-ms",
                                      "llm_provider-retry-after-ms"}
    assert rate_headers(None) == {}


@pytest.mark.parametrize("garbled", ["0.001", "0", "-5"])
def test_a_limit_under_one_a_minute_is_not_learned(garbled):
    # a garbled x-ratelimit-limit-requests would have held the run's bucket near zero
    hints = parse_headers({"x-ratelimit-limit-requests": garbled,
                           "x-ratelimit-api_key-limit-requests": "600"})
    assert hints.limit(tokens=False) == 600
    assert parse_headers({"x-ratelimit-limit-tokens": garbled}).limit(tokens=True) is None
