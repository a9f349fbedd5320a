"""The run's limits against providers: per-request charges, no bisection for what is not a row's
fault, a bad key stops the run, the breaker in an outage, learned gateway headers, a global
pause on a hintless 429. Adapter tests run against ``dfbatch.sim`` over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.events import BatchFailed, BatchStarted
from dfbatch.execute._limits import Cost, Outcome
from dfbatch.execute._stack import RunLimits
from dfbatch.llm import chat

TEXTS = [f"Document {i} is about topic {i % 5}. More words." for i in range(24)]
FRAME = pl.DataFrame({"text": TEXTS})
FAST = {"progress": False, "backoff_base": 0.01, "backoff_max": 0.05}


def _count(ts: list[str]) -> list[int]:
    return [len(t.split()) for t in ts]


def test_per_row_chat_charges_rpm_per_request_in_every_window(make_sim):
    # the server allows far more; the client is told 600/min real (10/s): per row, not per call
    server = make_sim(rpm=100_000, tpm=None, time_scale=0.1)
    fn = chat("sim-chat", base_url=server.url, max_tokens=8)
    out = dfbatch.process(FRAME, fn, items_per_batch=4, agents=2, rpm=600, **FAST)
    assert out["error"].null_count() == len(TEXTS)
    stats = server.stats
    assert stats.snapshot().requests == len(TEXTS)
    for window in (0.5, 1.0, 2.0):  # real seconds: at most 10 x T + one second's burst
        assert stats.max_in_window(window, admitted=False) <= 10 * window + 10 + 1


def test_a_bad_key_stops_the_run_after_a_few_calls_with_the_partial_result(make_sim, tmp_path):
    server = make_sim(api_key="sk-right")
    bad = chat("sim-chat", base_url=server.url, api_key="sk-wrong", max_tokens=8)
    with pytest.raises(dfbatch.RunStoppedError, match="API key was refused") as info:
        dfbatch.process(FRAME, bad, items_per_batch=4, agents=2, checkpoint=tmp_path / "ck",
                        **FAST)
    assert server.stats.snapshot().requests <= 2 * 2  # <= 2 x agents, no bisection
    partial = info.value.partial
    assert isinstance(partial, pl.DataFrame) and partial.height == len(TEXTS)
    assert (partial["error"] == "cancelled").all()
    good = chat("sim-chat", base_url=server.url, api_key="sk-right", max_tokens=8)
    out = dfbatch.process(FRAME, good, items_per_batch=4, agents=2, checkpoint=tmp_path / "ck",
                          **FAST)  # the checkpoint resumes once the key is fixed
    assert out["error"].null_count() == len(TEXTS)


def test_connection_errors_and_401s_are_retried_or_stop_never_bisected():
    calls: list[int] = []
    events: list[Any] = []

    async def down(batch: pl.DataFrame) -> list[str]:
        calls.append(batch.height)
        msg = "connection refused"
        raise ConnectionError(msg)

    out = dfbatch.process(FRAME.head(8), down, encoding=_count, items_per_batch=4, agents=1,
                          max_attempts=2, on_event=events.append, **FAST)
    assert calls == [4, 4, 4, 4]  # 2 batches x 2 attempts, never split in halves
    assert not any(isinstance(e, BatchFailed) and e.bisected for e in events)
    assert all(e.startswith("ConnectionError") for e in out["error"])

    class AuthError(Exception):
        status_code = 401

    async def refused(batch: pl.DataFrame) -> list[str]:
        calls.append(batch.height)
        msg = "Incorrect API key provided"
        raise AuthError(msg)

    calls.clear()
    with pytest.raises(dfbatch.RunStoppedError, match="HTTP 401"):
        dfbatch.process(FRAME, refused, encoding=_count, items_per_batch=4, agents=2, **FAST)
    assert calls and all(n == 4 for n in calls) and len(calls) <= 2 * 2


def test_an_outage_opens_the_breaker_and_no_row_fails(make_sim):
    # down for the first 150 simulated s (1.5 real s): the breaker holds the sends back
    server = make_sim(outage=(0.0, 150.0), time_scale=0.01, rpm=None, tpm=None)
    fn = chat("sim-chat", base_url=server.url, max_tokens=8)
    out = dfbatch.process(FRAME, fn, items_per_batch=4, agents=2, **FAST)
    assert out["error"].null_count() == len(TEXTS)
    stats = server.stats
    # the breaker opens after 5 failures in a row (up to 2 x agents more were already on
    # their way), then one probe at 1 s, 2 s … gets through; without it, every batch would
    # retry every few ms for 1.5 s
    assert stats.snapshot().down_requests <= 5 + 4 + 2
    assert stats.max_in_window(1.0, admitted=False, down=True) <= 5 + 4 + 1


def _limits_of_a_run(url: str, monkeypatch: pytest.MonkeyPatch) -> RunLimits:
    """The run limits of a short per-row chat run against ``url`` (all 6 rows answered)."""
    built: list[RunLimits] = []
    original = RunLimits.from_config

    def spy(*args: Any, **kwargs: Any) -> RunLimits:
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(RunLimits, "from_config", spy)
    fn = chat("sim-chat", base_url=url, max_tokens=8)
    out = dfbatch.process(FRAME.head(6), fn, items_per_batch=2, agents=1, **FAST)
    assert out["error"].null_count() == 6
    (limits,) = built
    return limits


def test_litellm_headers_are_learned(make_sim, monkeypatch):
    server = make_sim(rpm=600, tpm=None, headers="litellm", time_scale=0.1)
    limits = _limits_of_a_run(server.url, monkeypatch)
    assert limits.rpm is not None and limits.rpm.per_minute == pytest.approx(
        server.config.real_rpm)  # x-ratelimit-api_key-limit-requests, per real minute
    assert limits.tpm is not None and not limits.tpm.known  # no token limit stated


def test_ietf_ratelimit_fields_are_learned(make_sim, monkeypatch):
    # a gateway that speaks only the IETF draft: RateLimit-Policy "requests";q=10;w=1
    server = make_sim(rpm=600, tpm=None, headers="ietf", limit_window_s=1.0, time_scale=1.0,
                      ttft_s=0.0, per_token_s=0.0)
    limits = _limits_of_a_run(server.url, monkeypatch)
    assert limits.rpm is not None and limits.rpm.per_minute == pytest.approx(600.0)
    assert limits.tpm is not None and not limits.tpm.known  # the draft has no token unit


def test_headers_of_any_spelling_set_the_run_limits():
    async def main() -> tuple[float, float]:
        limits = RunLimits.from_config(dfbatch.BatchConfig(rpm=100), n_agents=2)
        hints_from = {"x-ratelimit-api_key-limit-requests": "600",
                      "x-ratelimit-api_key-remaining-requests": "599",
                      "x-ratelimit-limit-tokens": "9000"}
        from dfbatch.execute._headers import parse_headers

        await limits.shared.acquire(Cost(tokens=10))
        limits.shared.release(Cost(tokens=10), Outcome(hints=parse_headers(hints_from)))
        assert limits.rpm is not None and limits.tpm is not None
        return limits.rpm.per_minute, limits.tpm.per_minute

    assert asyncio.run(main()) == (100.0, 9000.0)  # the user's lower rpm wins


def test_a_hintless_429_pauses_every_send():
    class Limited(Exception):
        status_code = 429

    starts: list[float] = []
    limited_at: list[float] = []

    async def fn(batch: pl.DataFrame) -> list[str]:
        loop = asyncio.get_running_loop()
        starts.append(loop.time())
        if not limited_at:
            limited_at.append(loop.time())
            msg = "Rate limit reached"
            raise Limited(msg)
        await asyncio.sleep(0.01)
        return batch["text"].to_list()

    events: list[Any] = []
    out = dfbatch.process(FRAME.head(12), fn, encoding=_count, items_per_batch=1, agents=4,
                          on_event=events.append, **FAST)
    assert out["error"].null_count() == 12
    t429 = limited_at[0]
    later = [t for t in starts if t > t429 + 0.005]
    assert later and min(later) >= t429 + 1.0 - 1e-3  # every agent sat out the 1 s pause
    assert sum(isinstance(e, BatchStarted) for e in events) == 13


def test_a_refused_key_stops_a_streamed_run_with_what_was_written(tmp_path):
    class AuthError(Exception):
        status_code = 401

    calls: list[int] = []

    async def fn(batch: pl.DataFrame) -> list[str]:
        calls.append(batch.height)
        if len(calls) > 3:  # the key is revoked during the run
            msg = "Incorrect API key provided"
            raise AuthError(msg)
        return batch["text"].to_list()

    df = pl.DataFrame({"text": [f"row {i}" for i in range(200)]})
    out = tmp_path / "o.parquet"
    with pytest.raises(dfbatch.RunStoppedError, match="API key was refused") as info:
        df.lazy().batch.process(fn, out=out, chunk_rows=40, items_per_batch=4, agents=1,
                                max_concurrent_batches=1, encoding=_count, **FAST)
    summary = info.value.partial
    assert isinstance(summary, pl.DataFrame) and summary["rows_ok"][0] == 12
    assert len(calls) <= 4 + 2  # stopped at once, not after every row


def test_the_timeout_of_a_per_request_fn_counts_from_its_last_request_sent():
    from dfbatch.limits import per_request, request

    sent: list[float] = []

    @per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        async def one(text: str) -> str:
            async with request(tokens=1):
                sent.append(asyncio.get_running_loop().time())
                await asyncio.sleep(0.01)
            return text

        return list(await asyncio.gather(*(one(t) for t in batch["text"])))

    # 8 requests at 240/min (4/s, a 1 s burst of 4): the call lasts ~1 s, the timeout 0.5 s
    out = dfbatch.process(FRAME.head(8), fn, encoding=_count, items_per_batch=8, agents=1,
                          rpm=240, timeout=0.5, max_attempts=1, **FAST)
    assert out["error"].null_count() == 8
    assert max(sent) - min(sent) > 0.5  # the requests waited for the rate longer than that
