"""Provider models of the simulated endpoint, over real HTTP with the real OpenAI SDK.

Enforcement windows (per-second buckets, calendar minutes), header styles (OpenAI, none,
LiteLLM), outages, auth / permission / model errors, overload 429s, and the request log.
All at ``time_scale=0.01`` (a simulated minute lasts 0.6 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest

from dfbatch.errors import ConfigError
from dfbatch.sim import SimConfig, SimServer
from dfbatch.sim.ratelimit import RateLimiter
from dfbatch.sim.stats import SimStats, max_in_sliding_window

MESSAGES: Any = [{"role": "user", "content": "Summarize: One. Two."}]


@contextmanager
def client(server: SimServer, key: str = "sk-test") -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=10) as c:
        yield c


def ask(c: openai.OpenAI, model: str = "sim-chat") -> Any:
    """The raw response (headers + parsed body) of one chat request."""
    return c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=5)


def ratelimit_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if "ratelimit" in k or "retry-after" in k}


# -- enforcement windows -------------------------------------------------------------------
def test_per_second_window_holds_one_seconds_budget(make_sim):
    # 120 RPM enforced per second: the bucket holds 2 requests, not 120
    server = make_sim(rpm=120, limit_window_s=1.0, time_scale=1.0, ttft_s=0.0, per_token_s=0.0)
    with client(server) as c:
        first = [ask(c) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    assert first[0].headers["x-ratelimit-limit-requests"] == "120"  # still per minute
    assert first[1].headers["x-ratelimit-remaining-requests"] == "0"
    wait_ms = int(info.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 500  # one request refills in 0.5 s (a minute's bucket: 0.5 min)
    snap = server.stats.snapshot()
    assert (snap.requests, snap.rate_limited) == (3, 1)


def test_full_minute_bucket_admits_the_same_burst(make_sim):
    server = make_sim(rpm=120)  # the default window: a minute's burst
    with client(server) as c:
        for _ in range(10):
            ask(c)
    assert server.stats.snapshot().rate_limited == 0


def test_calendar_minute_resets_at_the_boundary_with_litellm_headers(make_sim):
    server = make_sim(rpm=3, limit_mode="calendar", headers="litellm", time_scale=0.02)
    with client(server) as c:
        ok = [ask(c) for _ in range(3)]
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
        hints = ratelimit_headers(info.value.response.headers)
        # the only hint: the window's length in whole real seconds (1.2 s -> "2")
        assert hints == {
            "x-ratelimit-api_key-limit-requests": "150",
            "x-ratelimit-api_key-remaining-requests": "0",
            "llm_provider-retry-after": "2",
        }
        assert info.value.body["code"] == "429"  # type: ignore[index]
        time.sleep(max(0.0, 1.2 - server.stats.now()) + 0.02)  # next simulated minute
        again = ask(c)
    assert ratelimit_headers(ok[0].headers) == {
        "x-ratelimit-api_key-limit-requests": "150",
        "x-ratelimit-api_key-remaining-requests": "2",
    }
    assert again.headers["x-ratelimit-api_key-remaining-requests"] == "2"
    assert server.stats.snapshot().by_status == {200: 4, 429: 1}


def test_calendar_window_retry_after_is_the_time_to_the_boundary(make_sim):
    # the clock reads :30 at start: the first minute ends after 30 simulated s (3 s real)
    server = make_sim(rpm=1, limit_mode="calendar", calendar_offset_s=30.0, time_scale=0.1)
    with client(server) as c:
        ask(c)
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    headers = info.value.response.headers
    rejected = server.stats.frame().row(1, named=True)
    assert rejected["t"] + int(headers["retry-after-ms"]) / 1000 == pytest.approx(3.0, abs=0.02)
    assert headers["retry-after"] == "3"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_no_headers_style_sends_no_hints(make_sim):
    server = make_sim(rpm=1, headers="none")
    with client(server) as c:
        ok = ask(c)
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    assert ratelimit_headers(ok.headers) == {}
    assert ratelimit_headers(info.value.response.headers) == {}
    assert "try again in" not in info.value.message
    assert server.stats.frame()["retry_after_s"].to_list() == [None, None]


def test_ietf_style_sends_the_drafts_fields_and_only_retry_after(make_sim):
    server = make_sim(rpm=120, tpm=None, headers="ietf", limit_window_s=1.0, time_scale=1.0,
                      ttft_s=0.0, per_token_s=0.0)
    with client(server) as c:
        first = ask(c)
        ask(c)
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    assert ratelimit_headers(first.headers) == {
        "ratelimit-policy": '"requests";q=2;w=1',  # 120 a minute, enforced per second
        "ratelimit": '"requests";r=1;t=0.5',
    }
    refused = ratelimit_headers(info.value.response.headers)
    assert refused["retry-after"] == "1" and "retry-after-ms" not in refused
    assert refused["ratelimit"].startswith('"requests";r=0;')
    assert "try again" not in info.value.message  # the wait is only in the headers


def test_openai_style_can_leave_out_retry_after_ms(make_sim):
    server = make_sim(rpm=1, retry_after_ms=False)
    with client(server) as c:
        ask(c)
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    headers = info.value.response.headers
    assert "retry-after-ms" not in headers and int(headers["retry-after"]) == 1


# -- outages -------------------------------------------------------------------------------
def test_outage_reset_looks_like_a_dead_server_then_recovers(make_sim):
    server = make_sim(outage=(0.0, 50.0))  # down for the first 0.5 real s
    with client(server) as c:
        with pytest.raises(openai.APIConnectionError):
            ask(c)
        time.sleep(max(0.0, 0.5 - server.stats.now()) + 0.01)
        assert ask(c).parse().choices[0].message.content == "One."
    snap = server.stats.snapshot()
    assert snap.down_requests == 1 and snap.by_status == {0: 1, 200: 1}
    assert server.stats.frame()["down"].to_list() == [True, False]


def test_outage_503(make_sim):
    server = make_sim(outage=(0.0, 1000.0), outage_kind="503")
    with client(server) as c, pytest.raises(openai.InternalServerError) as info:
        ask(c)
    assert info.value.status_code == 503
    assert server.stats.snapshot().by_kind == {"outage": 1}


def test_requests_reaching_a_dead_server_are_counted_per_window(make_sim):
    server = make_sim(outage=(0.0, 1000.0), outage_kind="503", time_scale=1.0)
    with client(server) as c:
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                ask(c)
    stats = server.stats
    assert stats.snapshot().down_requests == 3
    assert stats.max_in_window(60.0, simulated=True, down=True) == 3
    assert stats.max_in_window(1e-6, simulated=True, down=True) == 1  # one at a time
    assert stats.max_in_window(60.0, simulated=True, down=False) == 0


# -- account errors and overload -------------------------------------------------------------
def test_wrong_key_is_openais_401(make_sim):
    server = make_sim(api_key="sk-right")
    with client(server, key="sk-wrong") as c, pytest.raises(openai.AuthenticationError) as info:
        ask(c)
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert info.value.code == "invalid_api_key"
    assert server.stats.snapshot().by_kind == {"auth": 1}


def test_forbidden_model_is_403_and_unknown_model_404(make_sim):
    server = make_sim(forbidden_models=("sim-secret",), strict_models=True)
    with client(server) as c:
        with pytest.raises(openai.PermissionDeniedError):
            ask(c, model="sim-secret")
        with pytest.raises(openai.NotFoundError) as info:
            ask(c, model="gpt-nope")
        assert ask(c).status_code == 200
    assert info.value.code == "model_not_found"
    assert server.stats.snapshot().by_status == {403: 1, 404: 1, 200: 1}


def test_overload_429_is_not_a_rate_limit(make_sim):
    server = make_sim(overload_rate=1.0, rpm=100)
    with client(server) as c, pytest.raises(openai.RateLimitError) as info:
        ask(c)
    body = info.value.body
    assert body["type"] == "server_error" and body["code"] == "engine_overloaded"  # type: ignore[index]
    headers = info.value.response.headers
    assert "retry-after" not in headers and headers["x-ratelimit-remaining-requests"] == "100"
    snap = server.stats.snapshot()
    assert (snap.rate_limited, snap.overloaded) == (0, 1)


def test_overload_rate_is_seeded_and_partial(make_sim):
    server = make_sim(overload_rate=0.5, seed=3)
    with client(server) as c:
        outcomes = []
        for _ in range(40):
            try:
                outcomes.append(ask(c).status_code)
            except openai.RateLimitError:
                outcomes.append(429)
    assert 5 < outcomes.count(429) < 35
    assert server.stats.snapshot().overloaded == outcomes.count(429)


# -- config, limiter and log helpers ----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit_window_s": 0}, "limit_window_s"),
        ({"limit_mode": "sliding"}, "limit_mode must be one of"),
        ({"headers": "azure"}, "headers must be one of"),
        ({"outage": (5.0,)}, "outage must be"),
        ({"outage": (1.0, 0.0)}, "outage duration_s"),
        ({"outage_kind": "drop"}, "outage_kind"),
        ({"overload_rate": 2.0}, "overload_rate"),
        ({"calendar_offset_s": -1.0}, "calendar_offset_s"),
    ],
)
def test_provider_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SimConfig(**kwargs)


def test_is_down_is_a_half_open_interval():
    cfg = SimConfig(outage=(10.0, 20.0))
    assert [cfg.is_down(t) for t in (9.9, 10.0, 29.9, 30.0)] == [False, True, True, False]
    assert not SimConfig().is_down(10.0)


def test_calendar_limiter_counts_tokens_per_window():
    lim = RateLimiter(rpm=None, tpm=100, window_s=60.0, mode="calendar")
    assert lim.admit(60, now=1.0).ok and not lim.admit(60, now=59.0).ok
    assert lim.admit(60, now=60.0).ok  # the boundary: a fresh window
    assert lim.admit(101, now=61.0).retry_after_s == float("inf")


def test_per_second_bucket_refills_at_the_minute_rate():
    lim = RateLimiter(rpm=600, tpm=None, window_s=60.0, hold_s=1.0)  # holds 10
    assert sum(lim.admit(0, now=0.0).ok for _ in range(20)) == 10
    assert sum(lim.admit(0, now=0.5).ok for _ in range(20)) == 5  # 10 a second


def test_max_in_sliding_window():
    assert max_in_sliding_window([], 1.0) == 0
    assert max_in_sliding_window([3.0, 0.0, 0.5, 0.99, 1.0], 1.0) == 3  # unsorted input
    assert max_in_sliding_window([0.0, 0.5, 2.0], 1.0, weights=[5, 1, 7]) == 7.0


def test_stats_log_kinds_and_simulated_windows():
    stats = SimStats(time_scale=0.5)
    for t, status, kind, down in [
        (0.0, 200, None, False),
        (0.1, 429, None, False),
        (0.2, 429, "overload", False),
        (0.3, 0, "outage", True),
        (0.4, 0, "outage", True),
    ]:
        stats.record("chat", status, t=t, kind=kind, down=down)
    snap = stats.snapshot()
    assert (snap.rate_limited, snap.overloaded, snap.down_requests) == (1, 1, 2)
    assert snap.by_kind == {"ok": 1, "rate_limit": 1, "overload": 1, "outage": 2}
    # 0.15 real s = 0.3 simulated s: holds two outage arrivals 0.1 real s apart
    assert stats.max_in_window(0.3, simulated=True, down=True) == 2
    assert stats.max_in_window(0.15, down=True) == 2
    assert stats.max_in_window(0.05, down=True) == 1
    assert stats.frame()["sim_t"].to_list() == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


# -- runs that make no progress stop (outage_timeout) ----------------------------------------
@pytest.mark.parametrize(
    ("config", "said"),
    [
        ({"outage": (0.0, 1e6)}, "unreachable or failing"),  # a dead server (connection reset)
        ({"rpm": 0.001, "headers": "none"}, "rate-limit 429"),  # refuses every request
    ],
    ids=["dead", "always-429"],
)
def test_a_run_with_no_answer_stops_after_outage_timeout(make_sim, config, said):
    import polars as pl

    from dfbatch.errors import RunStoppedError
    from dfbatch.llm import chat

    server = make_sim(**config)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=8, base_url=server.url,
              api_key="sk-test")
    df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
    t0 = time.monotonic()
    with pytest.raises(RunStoppedError) as info:
        df.batch.process(fn, progress=False, outage_timeout=1.5, timeout=5.0)
    elapsed = time.monotonic() - t0
    assert said in str(info.value) and "outage_timeout" in str(info.value)
    partial = info.value.partial
    assert partial is not None and partial.height == 12
    assert partial["output"].is_null().all()
    assert elapsed < 30.0  # (it used to retry for many minutes)
