"""The benchmarks' virtual-clock provider models (``benchmarks.simapi``) and their clients.

Calendar windows and header styles, outages, bad keys; the hand-written baseline on a
per-second provider; the per-row adapter sends one request per row.
"""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

from benchmarks.baselines import Knobs, Sink, hint_of, run_handwritten
from benchmarks.pool_bench import PROVIDERS, lower_bound, per_row_fn, run_one
from benchmarks.simapi import SimAPI, SimConfig, SimConnectionError, SimError, Workload, run

WL = Workload.make(40, mean_tokens=50, seed=0)
FAST = SimConfig(base_latency=1.0, sigma=0.0, per_output_token_s=0.0, rtt=0.05)


def test_calendar_window_rejects_with_only_the_gateway_hint():
    cfg = SimConfig(
        rpm=3,
        limit_mode="calendar",
        calendar_offset_s=50.0,
        headers="litellm",
        base_latency=0.1,
        sigma=0.0,
    )
    api = SimAPI(cfg, WL)

    async def go() -> tuple[list[int], SimError, float]:
        await asyncio.gather(*(api.call([i]) for i in range(3)))
        try:
            await api.call([3])
        except SimError as exc:
            rejected = exc
        await asyncio.sleep(10.0 - api.now())  # the minute ends at :60 = 10 s in
        ok = await api.call([4])
        return ok.outputs, rejected, api.now()

    outputs, exc, _ = run(go())
    assert outputs == ["out:4"]
    assert exc.status_code == 429 and exc.retry_after is None
    assert exc.headers == {
        "x-ratelimit-api_key-limit-requests": "3",
        "x-ratelimit-api_key-remaining-requests": "0",
        "llm_provider-retry-after": "60",
    }
    assert hint_of(exc) is None  # not a spelling the OpenAI SDK (or the baselines) read


def test_no_headers_server_gives_no_hint_and_openai_gives_retry_after_ms():
    for style, hint in (("none", None), ("openai", 0.5)):
        api = SimAPI(SimConfig(rpm=120, burst_s=1.0, headers=style), WL)  # holds 2

        async def go(api: SimAPI = api) -> list[object]:
            calls = (api.call([0]), api.call([1]), api.call([2]))  # all at t = 0
            return await asyncio.gather(*calls, return_exceptions=True)

        *_, exc = run(go())
        assert isinstance(exc, SimError)
        assert hint_of(exc) == hint
        assert ("x-ratelimit-limit-requests" in exc.headers) == (style == "openai")


def test_outage_refuses_new_calls_and_resets_calls_in_service():
    api = SimAPI(
        SimConfig(outage=(5.0, 20.0), base_latency=10.0, sigma=0.0, per_output_token_s=0.0), WL
    )

    async def go() -> tuple[str, str, str]:
        results = []
        started = api.call([0])  # in service at t = 5: reset then
        late = asyncio.sleep(6.0)
        first = await asyncio.gather(started, late, return_exceptions=True)
        results.append(type(first[0]).__name__)
        try:
            await api.call([1])  # t = 6: refused
        except SimConnectionError as exc:
            results.append(type(exc).__name__)
        await asyncio.sleep(25.0 - api.now())
        results.append((await api.call([2])).outputs[0])
        return results[0], results[1], results[2]

    assert run(go()) == ("SimConnectionError", "SimConnectionError", "out:2")
    assert api.stats.down == 1
    assert [e["outcome"] for e in api.stats.log] == ["reset", "down", "ok"]


def test_bad_key_is_a_401_with_openais_code():
    api = SimAPI(SimConfig(bad_key=True), WL)

    async def go() -> SimError:
        with pytest.raises(SimError) as info:
            await api.call([0, 1])
        return info.value

    exc = run(go())
    assert (exc.status_code, exc.code, api.stats.n401) == (401, "invalid_api_key", 1)


def test_handwritten_client_paces_a_per_second_provider():
    cfg = SimConfig(
        rpm=600,
        tpm=30_000,
        burst_s=1.0,
        overhead_tokens=100,
        output_tokens_per_row=40,
        base_latency=0.5,
        sigma=0.2,
        seed=1,
    )
    wl = Workload.make(300, mean_tokens=100, seed=1)
    api = SimAPI(cfg, wl)
    k = Knobs(items_per_batch=1, rpm=600, tpm=30_000, overhead_tokens=100, output_tokens_per_row=40)

    async def go() -> tuple[Sink, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sink = await run_handwritten(api, wl, k, 0)
        return sink, loop.time() - t0

    sink, makespan = run(go())
    assert len(sink.outputs) == 300 and not sink.errors and sink.duplicates == 0
    tokens = sum(k.request_tokens(wl, [i]) for i in range(300))
    assert makespan <= 1.1 * (tokens / 500 + 0.5)  # tokens / (30k/60 per s) + a call
    assert api.stats.n429 <= 3


def test_per_row_adapter_sends_one_request_per_row():
    api = SimAPI(FAST, WL)
    fn = per_row_fn(api, WL, Knobs())

    async def go() -> list[object]:
        return await fn(pl.DataFrame({"id": [3, 4, 5], "text": ["r3", "r4", "r5"]}))

    assert run(go()) == ["out:3", "out:4", "out:5"]
    assert [e["ids"] for e in api.stats.log] == [[3], [4], [5]]


def test_per_row_adapter_keeps_answered_rows_for_the_retry():
    api = SimAPI(SimConfig(p_500=0.5, base_latency=0.1, sigma=0.0, seed=2), WL)
    fn = per_row_fn(api, WL, Knobs())
    batch = pl.DataFrame({"id": list(range(8)), "text": [f"r{i}" for i in range(8)]})

    async def go() -> list[object]:
        for _ in range(30):
            try:
                return await fn(batch)
            except SimError:
                continue
        raise AssertionError

    assert run(go()) == [f"out:{i}" for i in range(8)]
    assert sum(api.stats.served.values()) == 8  # no row was answered twice


def test_calendar_bound_counts_the_partial_first_minute():
    sc = next(s for s in PROVIDERS if s.name == "gateway-minute")
    wl = sc.workload(0, 0.25)  # 150 rows = one minute's limit: all in the first window
    bound, kind = lower_bound(sc, wl, sc.knobs())
    assert kind == "rpm" and bound < 1.0
    wl = sc.workload(0, 0.5)  # 300 rows: the second window opens at :60, 30 s in
    bound, kind = lower_bound(sc, wl, sc.knobs())
    assert 30.0 < bound < 31.0


def test_bad_key_scenario_counts_calls_until_the_run_stops():
    sc = next(s for s in PROVIDERS if s.name == "bad-key")
    result = run_one(sc, "gather", 0, 0.04)  # 40 rows: 10 batches, then one call per row
    assert (result.ok, result.calls) == (0, 10 + 40)


def test_the_ietf_drafts_fields_pace_a_run_nobody_told_the_limits():
    # 300 RPM enforced per second; only RateLimit-Policy / RateLimit say so (no x-ratelimit-*)
    runs = {}
    for style in ("none", "ietf"):
        sc = next(s for s in PROVIDERS if s.name == f"row-rpm-blind-1s-{style}")
        runs[style] = run_one(sc, "dfbatch", 0, 0.25)  # 150 rows
    ietf, blind = runs["ietf"], runs["none"]
    assert (ietf.ok, ietf.failed, blind.ok) == (150, 0, 150)
    assert ietf.n429 <= 4 < blind.n429  # the first sends, before any answer said the pace
    # (a bucket read as the draft's window, q per w: the safe reading, ~3% under the bucket)
    assert ietf.makespan <= 1.1 * ietf.bound and ietf.makespan < blind.makespan
