"""How fast a learned rate comes back after 429s, against ``dfbatch.sim``'s rate limiter.

The provider enforces a per-minute limit per second and sends no rate-limit headers; dfbatch is
not told the limit. A per-row client charges each request through ``dfbatch.limits.request``.
Time is virtual (``benchmarks.simapi.run``): makespans are simulated seconds, deterministic.
"""

from __future__ import annotations

import asyncio
from typing import Any

import polars as pl
import pytest

import dfbatch
import dfbatch.limits
from benchmarks.simapi import run
from dfbatch.execute._limits import Cost, Limits, Outcome
from dfbatch.execute._pause import PauseGate
from dfbatch.execute._rate import RateLimit
from dfbatch.sim.ratelimit import RateLimiter

ONE = Cost()
LIMITED = Outcome(ok=False, rate_limited=True)


class RateLimited(Exception):
    """A 429 with no hint (what ``classify`` sees from an SDK's RateLimitError)."""

    status_code = 429

    def __init__(self) -> None:
        super().__init__("429: Rate limit reached for requests per min (RPM)")


class PerSecondProvider:
    """``rpm`` enforced per second (a bucket of one second's refill), no headers."""

    def __init__(self, rpm: float, latency_s: float = 0.2, hold_s: float = 1.0) -> None:
        self.limiter = RateLimiter(rpm, None, window_s=60.0, hold_s=hold_s, style="none")
        self.latency_s = latency_s
        self.requests = 0
        self.refused = 0

    async def ask(self, text: str) -> str:
        self.requests += 1
        loop = asyncio.get_running_loop()
        admitted = self.limiter.admit(0, now=loop.time()).ok
        await asyncio.sleep(self.latency_s)
        if not admitted:
            self.refused += 1
            raise RateLimited()
        return text.upper()


def per_row_client(provider: PerSecondProvider) -> Any:
    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        async def one(text: str) -> str:
            async with dfbatch.limits.request(tokens=10):
                return await provider.ask(text)

        return list(await asyncio.gather(*(one(t) for t in batch["text"])))

    return fn


def blind_run(rows: int, rpm: float, **provider_kw: float
              ) -> tuple[float, PerSecondProvider, pl.DataFrame]:
    provider = PerSecondProvider(rpm, **provider_kw)
    df = pl.DataFrame({"text": [f"row {i}" for i in range(rows)]})

    async def main() -> tuple[float, pl.DataFrame]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await dfbatch.aprocess(df, per_row_client(provider), progress=False,
                                     encoding=lambda ts: [5] * len(ts), timeout=30.0)
        return loop.time() - t0, out

    makespan, out = run(main())
    return makespan, provider, out


def test_an_unknown_per_second_limit_is_found_again_within_seconds():
    # 20 requests per second, held per second; 600 rows: 29 s at the limit (+ one latency)
    makespan, provider, out = blind_run(600, rpm=1200)
    bound = (600 - 20) / 20 + 0.2
    assert out["error"].is_null().all()
    # was 1.31x: the rate guessed after the first 429s (20/s) regrew slowly after each later
    # 429, and the sends a pause held were charged during it and all sent at its end
    assert makespan <= 1.15 * bound, makespan
    assert provider.refused <= 0.3 * provider.requests


def _call(limit: RateLimit, outcome: Outcome, cost: Cost = ONE) -> Any:
    async def go() -> None:
        await limit.acquire(cost)
        await asyncio.sleep(0.1)  # a round trip
        limit.release(cost, outcome)

    return asyncio.create_task(go())


async def _guessed(limit: RateLimit, cost: Cost = ONE) -> float:
    """Two answers a second apart, then a 429: the limit guesses the rate answered (1 call/s)."""
    for _ in range(2):
        await _call(limit, Outcome(), cost)
        await asyncio.sleep(1.0)
    await _call(limit, LIMITED, cost)
    return limit.rate


def test_a_guessed_rate_doubles_per_second_while_it_paces_then_backs_off():
    async def main() -> list[float]:
        rpm = RateLimit(None)
        seen = [await _guessed(rpm)]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < 6.0:  # a client that always has work: the rate paces it
            await asyncio.gather(*(_call(rpm, Outcome()) for _ in range(4)))
        seen.append(rpm.rate)
        await _call(rpm, LIMITED)  # the provider refuses: back off below what was sent
        seen.append(rpm.rate)
        return seen

    guess, grown, backed_off = run(main())
    assert guess == pytest.approx(1.0, rel=0.2)
    assert grown >= 16 * guess  # (it was 1.1x: +guess/60 per second)
    assert backed_off <= 0.7 * grown


def test_a_guessed_rate_does_not_grow_while_something_else_holds_the_sends():
    async def main() -> tuple[float, float]:
        tpm = RateLimit(None, tokens=True)
        guess = await _guessed(tpm, Cost(tokens=10))  # 10 tokens a second
        for _ in range(20):  # one small call every 2 s: the rate never paces
            await asyncio.sleep(2.0)
            await _call(tpm, Outcome(), Cost(tokens=1))
        return guess, tpm.rate

    guess, after = run(main())
    assert after == pytest.approx(guess)


def test_sends_held_by_a_pause_are_paced_after_it_not_sent_at_once():
    async def main() -> list[float]:
        gate = PauseGate()
        rpm = RateLimit(600)  # 10 a second, a bucket of 10
        rpm.pause = gate
        chain = Limits([rpm, gate])
        gate.pause(1.0)
        sent = []

        async def send() -> None:
            await chain.acquire(ONE)
            sent.append(asyncio.get_running_loop().time())

        await asyncio.gather(*(send() for _ in range(30)))
        return sent

    sent = run(main())
    assert min(sent) == pytest.approx(1.0)
    assert sum(1 for t in sent if t <= 1.0 + 1e-9) == 10  # the bucket's burst, not all 30
    assert max(sent) == pytest.approx(3.0)  # then 10 a second


def test_waiting_out_a_pause_does_not_make_the_rate_look_binding():
    # recent_wait says whether the bucket binds (dynamic batching, hedging read it): a pause
    # on 429s is not the bucket pacing
    async def main() -> float:
        gate = PauseGate()
        rpm = RateLimit(600)  # 10 a second, a bucket of 10: five sends never wait for it
        rpm.pause = gate
        gate.pause(2.0)
        for _ in range(5):
            await rpm.acquire(ONE)
        return rpm.recent_wait

    assert run(main()) == pytest.approx(0.0, abs=1e-6)
