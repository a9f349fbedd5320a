"""Charging the run's limits per request from inside fn (``dfbatch.limits.request``)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import dfbatch.limits
from benchmarks.simapi import run
from dfbatch.errors import ConfigError, FatalError
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._charge import bind_run_limits, bound, charges_per_request, count_tokens
from dfbatch.execute._limits import Limits
from dfbatch.execute._pause import PauseGate
from dfbatch.execute._rate import RateLimit

REQUEST = httpx.Request("POST", "http://sim.invalid/v1/chat/completions")


def now() -> float:
    return asyncio.get_running_loop().time()


def rate_limited(headers: dict[str, str] | None = None) -> Exception:
    body = {"error": {"message": "Rate limit reached", "type": "requests",
                      "code": "rate_limit_exceeded"}}
    response = httpx.Response(429, json=body, headers=headers or {}, request=REQUEST)
    return openai.RateLimitError("Rate limit reached", response=response, body=body["error"])


def test_outside_a_run_it_charges_nothing_and_never_waits():
    async def main() -> float:
        assert bound() is None
        for _ in range(1000):
            async with dfbatch.limits.request(tokens=10**9) as req:
                req.report(headers={"retry-after": "60"}, tokens=5)
        return now()

    assert run(main()) == pytest.approx(0.0)


def test_each_request_is_charged_to_rpm_and_tpm():
    async def main() -> tuple[list[float], float]:
        rpm, tpm = RateLimit(60), RateLimit(60_000, tokens=True)  # 1 request / 1,000 tokens a s
        times = []
        with bind_run_limits(Limits([rpm, tpm])):
            for _ in range(4):
                async with dfbatch.limits.request(tokens=500):
                    times.append(now())
        return times, tpm.level

    times, level = run(main())
    assert times == pytest.approx([0, 1, 2, 3])
    assert level == pytest.approx(500)  # 1,000 a second refill, 500 a request


def test_real_tokens_refund_the_estimate_and_headers_sync_the_bucket():
    async def main() -> tuple[float, float]:
        rpm, tpm = RateLimit(600), RateLimit(60_000, tokens=True)
        with bind_run_limits(Limits([rpm, tpm])):
            async with dfbatch.limits.request(tokens=900) as req:
                req.report(headers={"x-ratelimit-remaining-requests": "300"}, tokens=100)
        return tpm.level, rpm.capacity

    level, capacity = run(main())
    assert level == pytest.approx(900)  # 1,000 - 900 charged, 800 refunded
    assert capacity == 301


def test_a_429_inside_pauses_every_request_and_is_re_raised_unchanged():
    async def main() -> tuple[float, int]:
        gate = PauseGate()
        stack = Limits([RateLimit(6000), gate])
        exc = rate_limited({"retry-after-ms": "2500"})
        with bind_run_limits(stack):
            with pytest.raises(openai.RateLimitError) as info:
                async with dfbatch.limits.request(tokens=1):
                    raise exc
            assert info.value is exc
            async with dfbatch.limits.request(tokens=1):
                t = now()
        return t, gate.pauses

    assert run(main()) == (pytest.approx(2.5), 1)


def test_connection_errors_inside_open_the_breaker():
    async def main() -> tuple[bool, float, bool]:
        breaker = Breaker(threshold=3, first_s=1.0)
        with bind_run_limits(Limits([]), breaker=breaker):
            for _ in range(3):
                with pytest.raises(openai.APIConnectionError):
                    async with dfbatch.limits.request():
                        raise openai.APIConnectionError(request=REQUEST)
            opened = not breaker.closed
            async with dfbatch.limits.request():  # the probe, after a second
                t = now()
        return opened, t, breaker.closed

    assert run(main()) == (True, pytest.approx(1.0), True)


def test_a_cancelled_request_gives_its_units_back():
    async def main() -> float:
        tpm = RateLimit(60_000, tokens=True)
        with bind_run_limits(Limits([tpm])):

            async def hang() -> None:
                async with dfbatch.limits.request(tokens=100):
                    await asyncio.sleep(10)

            task = asyncio.create_task(hang())
            await asyncio.sleep(1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return tpm.level

    assert run(main()) == pytest.approx(900)  # charged, then refilled for one second


def test_per_request_marks_fn_and_count_tokens_uses_the_run_counter():
    async def fn(batch):  # pragma: no cover - never called
        return batch

    assert not charges_per_request(fn)
    assert dfbatch.limits.per_request(fn) is fn and charges_per_request(fn)
    assert count_tokens(["hello world"]) == [2]
    assert count_tokens(["hello world"], model="no-such-model") == [2]

    async def main() -> list[int]:
        with bind_run_limits(Limits([]), count=lambda texts: [len(t) for t in texts]):
            return count_tokens(["hello world"])

    assert run(main()) == [11]


def test_a_request_left_running_after_its_call_ended_keeps_no_unit():
    # fn gathers its requests without return_exceptions: the first 429 ends the call while its
    # siblings still wait for the run's limits; one that goes out afterwards used to find the
    # call's deadline finished, raise, and keep its slot of the slow start for ever (a hang)
    import polars as pl

    failed: set[int] = set()

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[int]:
        async def one(i: int) -> int:
            async with dfbatch.limits.request(tokens=1):
                await asyncio.sleep(0.01 if i == 0 else 0.1)
                if i == 0 and i not in failed:
                    failed.add(i)
                    raise rate_limited()
                return i

        return list(await asyncio.gather(*(one(i) for i in batch["id"])))

    df = pl.DataFrame({"id": range(8), "text": ["w"] * 8})
    out = run(dfbatch.aprocess(df, fn, agents=1, items_per_batch=8, progress=False,
                               encoding=lambda ts: [1] * len(ts), timeout=30.0))
    assert out["output"].to_list() == list(range(8))


@pytest.mark.parametrize("tokens", [None, -1, float("nan"), float("inf"), "12", "abc", True])
def test_tokens_must_be_a_count_and_the_error_names_the_argument(tokens):
    async def main() -> None:
        async with dfbatch.limits.request(tokens=tokens):
            pass  # pragma: no cover - refused before

    with pytest.raises(ConfigError, match=r"request\(tokens=\.\.\.\) takes a number of tokens"):
        run(main())


def test_float_tokens_round_up_and_report_checks_its_tokens():
    async def main() -> int:
        async with dfbatch.limits.request(tokens=2.2) as req:
            with pytest.raises(ConfigError, match=r"report\(tokens=\.\.\.\)"):
                req.report(tokens="many")
            return req.tokens

    assert run(main()) == 3


def test_a_request_over_the_whole_token_limit_fails_at_once_instead_of_waiting():
    # 10**30 tokens against tpm=60,000 used to leave the bucket in debt for ever: a hang
    async def main() -> tuple[float, float]:
        tpm = RateLimit(60_000, tokens=True)
        with bind_run_limits(Limits([tpm])):
            with pytest.raises(FatalError, match="more than the run's whole token limit"):
                async with dfbatch.limits.request(tokens=10**30):
                    pass  # pragma: no cover - refused before
            async with dfbatch.limits.request(tokens=60_000):  # a whole minute still goes
                pass
        return now(), tpm.level

    t, level = run(main())
    assert t == pytest.approx(0.0)  # a whole minute still goes, leaving the bucket in debt
    assert level == pytest.approx(1_000 - 60_000)


@pytest.mark.parametrize("headers", [
    [("x-ratelimit-remaining-requests", "300")],
    {b"x-ratelimit-remaining-requests": b"300"},
    [(b"X-RateLimit-Remaining-Requests", b"300")],
])
def test_report_reads_pairs_and_bytes_headers(headers):
    async def main() -> float:
        rpm = RateLimit(600)
        with bind_run_limits(Limits([rpm])):
            async with dfbatch.limits.request() as req:
                req.report(headers=headers)
        return rpm.capacity

    assert run(main()) == 301  # (ignored before: the bucket stayed at one second's 10)


def test_report_refuses_headers_that_are_not_headers():
    req = dfbatch.limits.Request(1)
    with pytest.raises(ConfigError, match=r"report\(headers=\.\.\.\) takes the answer's headers"):
        req.report(headers="retry-after: 5")


def test_a_sync_fn_in_a_thread_charges_the_run_from_its_own_event_loop():
    # a sync fn (executor="thread") can only use `async with request()` on a loop of its own;
    # the run's buckets are asyncio objects of the run's loop: RuntimeError "bound to a
    # different event loop" for every row that had to wait, before
    import time

    import polars as pl

    sent: list[float] = []

    @dfbatch.limits.per_request
    def fn(batch: pl.DataFrame) -> list[str]:
        async def one(text: str) -> str:
            async with dfbatch.limits.request(tokens=1):
                sent.append(time.monotonic())
                await asyncio.sleep(0.01)
                return text.upper()

        async def rows() -> list[str]:
            return list(await asyncio.gather(*(one(t) for t in batch["text"])))

        return asyncio.run(rows())

    df = pl.DataFrame({"text": [f"t{i}" for i in range(12)]})
    out = dfbatch.process(df, fn, rpm=600, executor="thread", agents=2, progress=False)
    assert out["error"].null_count() == 12
    assert out["output"].to_list() == [f"T{i}" for i in range(12)]
    # 10 a second, a burst of one second's worth (10): the last two wait for the refill
    assert max(sent) - min(sent) >= 0.15
