"""The circuit breaker: opens on outages, probes with one call at growing intervals, closes on
a sign of life (virtual clock: no real sleeps)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from benchmarks.simapi import run
from dfbatch.execute._breaker import Breaker

REQUEST = httpx.Request("POST", "http://sim.invalid/v1/chat/completions")


def now() -> float:
    return asyncio.get_running_loop().time()


async def fail_n(breaker: Breaker, n: int) -> None:
    for _ in range(n):
        breaker.record(await breaker.wait(), "outage")


def test_opens_after_threshold_outages_in_a_row_and_not_before():
    async def main() -> list[bool]:
        breaker = Breaker(threshold=3)
        states = []
        for health in ("outage", "outage", "other", "outage", "outage", "outage"):
            breaker.record(await breaker.wait(), health)  # type: ignore[arg-type]
            states.append(breaker.closed)
        return states

    assert run(main()) == [True, True, True, True, True, False]


def test_a_dead_service_gets_one_probe_at_doubling_intervals_then_everyone_goes():
    async def main() -> tuple[list[float], list[float], int]:
        breaker = Breaker(threshold=2, first_s=1.0, max_s=8.0)
        await fail_n(breaker, 2)
        probes: list[float] = []
        released: list[float] = []

        async def client(i: int) -> None:
            while True:
                ticket = await breaker.wait()
                if ticket.probe:
                    probes.append(now())
                    alive = now() >= 20.0  # the service comes back at t = 20
                    breaker.record(ticket, "ok" if alive else "outage")
                    if alive:
                        released.append(now())
                        return
                else:
                    released.append(now())
                    return

        await asyncio.gather(*(client(i) for i in range(50)))
        return probes, released, breaker.opens

    probes, released, opens = run(main())
    assert probes == pytest.approx([1, 3, 7, 15, 23])  # 1, 2, 4, 8, 8 (capped) apart
    assert released == pytest.approx([23.0] * 50) and opens == 1


def test_a_success_of_a_call_sent_before_the_outage_does_not_close_it():
    async def main() -> list[bool]:
        breaker = Breaker(threshold=2)
        old = await breaker.wait()
        await fail_n(breaker, 2)
        breaker.record(old, "ok")
        out = [breaker.closed]
        probe = await breaker.wait()
        breaker.record(probe, "other")  # a 400 or a 429: the service answers
        out.append(breaker.closed)
        return out

    assert run(main()) == [False, True]


def test_opens_when_most_recent_calls_fail_even_with_successes_between():
    async def main() -> bool:
        breaker = Breaker(threshold=100, min_calls=10, ratio=0.5, window_s=10.0)
        for i in range(10):
            breaker.record(await breaker.wait(), "outage" if i % 2 else "ok")
        return breaker.closed

    assert run(main()) is False


def test_a_cancelled_probe_lets_another_one_through():
    async def main() -> list[bool]:
        breaker = Breaker(threshold=1, first_s=1.0)
        await fail_n(breaker, 1)
        first = await breaker.wait()
        breaker.cancel(first)
        second = await breaker.wait()
        return [first.probe, second.probe, now() == pytest.approx(1.0)]

    assert run(main()) == [True, True, True]


def test_admit_records_from_the_exception():
    async def main() -> list[bool]:
        breaker = Breaker(threshold=2)
        out = []
        for exc in (openai.APIConnectionError(request=REQUEST), httpx.ReadTimeout("slow")):
            with pytest.raises(Exception):  # noqa: B017
                async with breaker.admit():
                    raise exc
        out.append(breaker.closed)  # two outages: open
        async with breaker.admit() as ticket:
            out.append(ticket.probe)
        out.append(breaker.closed)  # the probe answered
        with pytest.raises(ValueError):
            async with breaker.admit():
                msg = "a bug in fn is not an outage"
                raise ValueError(msg)
        out.append(breaker.closed)
        return out

    assert run(main()) == [False, True, True, True]


def test_injected_clock_and_sleep():
    t = [0.0]

    async def sleep(seconds: float) -> None:
        t[0] += seconds

    async def main() -> tuple[bool, float]:
        breaker = Breaker(threshold=1, first_s=2.0, clock=lambda: t[0], sleep=sleep)
        breaker.record(await breaker.wait(), "outage")
        ticket = await breaker.wait()
        return ticket.probe, t[0]

    assert asyncio.run(main()) == (True, 2.0)


# -- giving up: a run that makes no progress stops ------------------------------------------
def test_a_dead_service_is_given_up_after_give_up_s_without_an_answer():
    from dfbatch.errors import NoProgressError

    async def main() -> tuple[float, BaseException | None, int]:
        breaker = Breaker(threshold=2, give_up_s=100.0)
        try:
            while True:  # one probe at a time, at growing intervals, for ever
                breaker.record(await breaker.wait(), "outage")
        except NoProgressError as exc:
            return now(), exc, breaker.probes
        return now(), None, breaker.probes

    t, exc, probes = run(main())
    assert 100.0 <= t <= 100.0 + 10.0  # the first probe failing after 100 s (probes <= 10 s)
    assert isinstance(exc, NoProgressError) and exc.cause == "outage"
    # 1, 2, 4, 8 s apart, then every 10 s (max_s): a dead service sees one request in 10 s
    assert "outage_timeout=100" in str(exc) and probes <= 4 + 100 // 10


def test_an_answer_restarts_the_clock_and_429s_count_as_no_progress():
    async def main() -> list[bool]:
        breaker = Breaker(give_up_s=60.0)
        out = []
        breaker.stalled("rate_limit")  # t=0: the first 429 since an answer
        await asyncio.sleep(59.0)
        breaker.stalled("rate_limit")
        out.append(breaker.stopped is None)  # 59 s: not yet
        breaker.record(await breaker.wait(), "ok")  # an answer: progress
        await asyncio.sleep(30.0)
        breaker.stalled("rate_limit")
        out.append(breaker.stopped is None)  # the clock restarted
        await asyncio.sleep(61.0)
        breaker.stalled("rate_limit")
        out.append(breaker.stopped is None)  # 61 s of nothing but 429s
        out.append("rate-limit 429" in str(breaker.stopped))
        return out

    assert run(main()) == [True, True, False, True]


def test_no_give_up_by_default_in_the_breaker():
    async def main() -> bool:
        breaker = Breaker()
        breaker.stalled("outage")
        await asyncio.sleep(10_000.0)
        breaker.stalled("outage")
        return breaker.stopped is None

    assert run(main())


def test_each_stopped_call_gets_its_own_copy_of_the_run_stopping_error():
    # an adapter attaches the answers its batch got to the error it raises: one object shared
    # by every stopped batch handed one batch's answers to another (tests/test_break_limits)
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    refused = openai.AuthenticationError(
        "Incorrect API key provided", response=httpx.Response(401, request=request),
        body={"error": {"code": "invalid_api_key"}})
    refused.dfbatch_partial = "the first batch's answers"  # type: ignore[attr-defined]

    async def main() -> list[BaseException]:
        breaker = Breaker()
        breaker.stop(refused)
        raised = []
        for _ in range(2):
            try:
                await breaker.wait()
            except openai.AuthenticationError as exc:
                raised.append(exc)
        try:
            await breaker.sleep(1.0)
        except openai.AuthenticationError as exc:
            raised.append(exc)
        assert all(breaker.is_stop(exc) for exc in [refused, *raised])
        assert not breaker.is_stop(openai.AuthenticationError(
            "other", response=httpx.Response(401, request=request), body=None))
        return raised

    raised = run(main())
    assert len({id(exc) for exc in [refused, *raised]}) == 4
    for exc in raised:
        assert str(exc) == str(refused) and exc.status_code == 401
        assert exc.body == refused.body and exc.response is refused.response
        assert not hasattr(exc, "dfbatch_partial")


def test_a_storm_of_503_server_error_opens_the_breaker_and_no_row_fails():
    # dfbatch.sim's and LiteLLM's 503 for a service that is down says type "server_error":
    # read as an overloaded server's 503 (AIMD only), it was retried batch by batch until
    # the attempts ran out, and rows failed; it is an outage the breaker counts as well
    import polars as pl

    import dfbatch

    request = httpx.Request("POST", "http://x/v1/chat/completions")
    calls: list[float] = []

    async def fn(batch: pl.DataFrame) -> list[str]:
        t = asyncio.get_running_loop().time()
        calls.append(t)
        await asyncio.sleep(0.2)
        if t < 20.0:
            msg = "Service Unavailable"
            raise openai.InternalServerError(
                msg, response=httpx.Response(503, request=request),
                body={"message": msg, "type": "server_error",
                      "code": "service_unavailable"})
        return [t.upper() for t in batch["text"]]

    async def main() -> pl.DataFrame:
        df = pl.DataFrame({"text": [f"row {i}" for i in range(200)]})
        return await dfbatch.aprocess(df, fn, progress=False, hedge_after=None)

    out = run(main())
    assert out["error"].null_count() == 200
    during = [t for t in calls if 2.0 <= t < 20.0]  # after the first failures: probes only
    assert len(during) <= 18, len(during)  # at most one a second
