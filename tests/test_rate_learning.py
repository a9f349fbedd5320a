"""Rate limits that learn how the provider enforces: one second's burst, AIMD on the rate,
headers, unknown limits, and a global pause on 429s (virtual clock: no real sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from benchmarks.simapi import run
from dfbatch.execute._headers import RateHints
from dfbatch.execute._limits import AdaptiveLimit, Cost, Outcome
from dfbatch.execute._pause import PauseGate
from dfbatch.execute._rate import RateLimit

ONE = Cost()
LIMITED = Outcome(ok=False, rate_limited=True)


def now() -> float:
    return asyncio.get_running_loop().time()


async def in_task(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` in its own task (its own context: acquire and release pair up there)."""
    return await asyncio.create_task(fn())


def test_starts_with_one_second_of_burst():
    async def main() -> list[float]:
        rpm = RateLimit(600)  # 10 per second
        times = []
        for _ in range(20):
            await rpm.acquire(ONE)
            times.append(now())
        return times

    times = run(main())
    assert times[9] == pytest.approx(0.0) and times[10] > 0.01
    assert times[19] == pytest.approx(1.0)


def test_never_more_than_one_second_of_burst_even_if_burst_allows_more():
    assert RateLimit(600, burst=0.1).capacity == 10
    assert RateLimit(6000, burst=0.001).capacity == 6  # burst (minutes) is still a ceiling
    assert RateLimit(30).capacity == 1  # at least one request
    assert RateLimit(150_000, tokens=True).capacity == 2500


def test_headers_showing_a_bigger_bucket_let_it_grow():
    async def main() -> tuple[float, float]:
        rpm = RateLimit(600)
        await rpm.acquire(ONE)
        rpm.observe(RateHints(remaining_requests=500), ONE)
        return rpm.capacity, rpm.level

    capacity, level = run(main())
    assert capacity == 501 and level == 500


def test_rate_limit_429_lowers_the_rate_once_per_episode_and_clean_calls_regrow_it():
    async def main() -> list[float]:
        rpm = RateLimit(600, regrow_s=60.0)
        seen = []

        async def call(outcome: Outcome) -> None:
            await rpm.acquire(ONE)
            rpm.release(ONE, outcome)

        early = asyncio.Event()

        async def sent_before_the_drop() -> None:
            await rpm.acquire(ONE)
            await early.wait()
            rpm.release(ONE, LIMITED)

        straggler = asyncio.create_task(sent_before_the_drop())
        await asyncio.sleep(0)
        await in_task(lambda: call(LIMITED))
        seen.append(rpm.rate)  # 10 * 0.7
        early.set()
        await straggler
        seen.append(rpm.rate)  # unchanged: sent before the drop
        await in_task(lambda: call(LIMITED))
        seen.append(rpm.rate)  # a new episode: 10 * 0.49
        for _ in range(80):
            await in_task(lambda: call(Outcome()))
            await asyncio.sleep(1.0)
            if rpm.rate == 10.0:
                break
        seen.append(now())
        return seen

    first, after_straggler, second, t_back = run(main())
    assert first == pytest.approx(7.0) and after_straggler == pytest.approx(7.0)
    assert second == pytest.approx(4.9)
    assert 30 <= t_back <= 35  # (10 - 4.9) / (10 / 60) = 30.6 s of clean calls


def test_the_bucket_shrinks_on_a_429_and_headers_cannot_grow_it_for_a_while():
    async def main() -> list[float]:
        rpm = RateLimit(600)
        out = []

        async def call(outcome: Outcome, hints: RateHints | None = None) -> None:
            await rpm.acquire(ONE)
            rpm.release(ONE, outcome)
            if hints is not None:
                rpm.observe(hints, ONE)
            out.append(rpm.capacity)

        await in_task(lambda: call(Outcome(), RateHints(remaining_requests=500)))
        await in_task(lambda: call(LIMITED))
        await in_task(lambda: call(Outcome(), RateHints(remaining_requests=500)))
        await asyncio.sleep(61)
        await in_task(lambda: call(Outcome(), RateHints(remaining_requests=500)))
        return out

    assert run(main()) == pytest.approx([501, 7, 7, 501])


def test_a_429_for_the_other_limit_does_not_lower_this_one():
    async def main() -> tuple[float, float]:
        rpm, tpm = RateLimit(600), RateLimit(60_000, tokens=True)
        hints = RateHints(remaining_requests=5, remaining_tokens=0)
        cost = Cost(tokens=100)

        async def call() -> None:
            for lim in (rpm, tpm):
                await lim.acquire(cost)
            for lim in (rpm, tpm):
                lim.release(cost, Outcome(ok=False, rate_limited=True, hints=hints))

        await in_task(call)
        return rpm.rate, tpm.rate

    assert run(main()) == (10.0, pytest.approx(700.0))


def test_an_unknown_limit_passes_everything_then_learns_from_headers():
    async def main() -> list[Any]:
        rpm = RateLimit(None)
        for _ in range(1000):
            await rpm.acquire(ONE)
        out: list[Any] = [now(), rpm.known]

        async def call() -> None:
            await rpm.acquire(ONE)
            rpm.release(ONE, Outcome(hints=RateHints(limit_requests=120, remaining_requests=1)))

        await in_task(call)
        out += [rpm.per_minute, rpm.rate, rpm.capacity]
        return out

    t, known, *learned = run(main())
    assert t == pytest.approx(0.0) and not known and learned == [120.0, 2.0, 2.0]


def test_an_unknown_limit_paces_at_what_was_answered_when_429s_come():
    async def main() -> tuple[float, float]:
        rpm = RateLimit(None)

        async def call(outcome: Outcome) -> None:
            await rpm.acquire(ONE)
            rpm.release(ONE, outcome)

        for _ in range(10):  # 20 requests per second for 10 s
            for _ in range(20):
                await in_task(lambda: call(Outcome()))
            await asyncio.sleep(1.0)
        await in_task(lambda: call(LIMITED))
        t0 = now()
        for _ in range(29):
            await rpm.acquire(ONE)
        return rpm.rate, now() - t0

    rate, elapsed = run(main())
    assert rate == pytest.approx(20, rel=0.01)  # 20 a second were answered
    assert elapsed == pytest.approx((29 - rate) / rate, rel=0.05)  # one second's burst, then paced


def test_windows_hold_under_a_lowered_rate():
    async def main() -> list[float]:
        rpm = RateLimit(600)
        await in_task(lambda: _limited(rpm))
        times = []
        for _ in range(100):
            await rpm.acquire(ONE)
            times.append(now())
        return times

    times = run(main())
    for i, t in enumerate(times):  # any window [t, t + T]: at most burst + 7 / s * T
        for j in range(i, len(times)):
            assert j - i + 1 <= 7 + 7.0 * (times[j] - t) + 1e-6


async def _limited(limit: RateLimit) -> None:
    await limit.acquire(ONE)
    limit.release(ONE, LIMITED)


def test_pause_gate_grows_its_floor_once_per_episode_and_resets_after_a_success():
    async def main() -> list[float]:
        gate = PauseGate()
        ends = []

        async def call(outcome: Outcome) -> None:
            await gate.acquire()
            gate.release(None, outcome)

        early = asyncio.Event()

        async def old_call() -> None:
            await gate.acquire()
            await early.wait()
            gate.release(None, LIMITED)

        old = asyncio.create_task(old_call())
        await asyncio.sleep(0)
        for _ in range(4):
            await in_task(lambda: call(LIMITED))
            ends.append(gate.until - now())
            if not early.is_set():
                early.set()
                await old  # sent before the pause began: no growth
                ends.append(gate.until - now())
        await in_task(lambda: call(Outcome()))  # waits out the pause, succeeds: floor resets
        await in_task(lambda: call(LIMITED))
        ends.append(gate.until - now())
        return ends

    assert run(main()) == pytest.approx([1.0, 1.0, 2.0, 4.0, 8.0, 1.0])


def test_pause_floor_stops_at_a_minute_and_hints_win():
    async def main() -> list[float]:
        gate = PauseGate()
        for _ in range(9):
            await in_task(lambda: _gate_call(gate, LIMITED))
        out = [gate.floor]
        hinted = Outcome(ok=False, rate_limited=True, retry_after=90.0)
        await in_task(lambda: _gate_call(gate, hinted))
        out.append(gate.until - now())
        t0 = now()
        await gate.acquire()
        out.append(now() - t0)
        return out

    assert run(main()) == pytest.approx([60.0, 90.0, 90.0])


async def _gate_call(gate: PauseGate, outcome: Outcome) -> None:
    await gate.acquire()
    gate.release(None, outcome)


def test_every_send_waits_out_a_pause():
    async def main() -> list[float]:
        gate = PauseGate()
        gate_opened = []

        async def sender() -> None:
            await gate.acquire()
            gate_opened.append(now())

        await in_task(lambda: _gate_call(gate, Outcome(ok=False, rate_limited=True,
                                                       retry_after=3.0)))
        await asyncio.gather(*(sender() for _ in range(5)))
        return gate_opened

    assert run(main()) == pytest.approx([3.0] * 5)


def test_overload_lowers_concurrency_even_when_a_rate_paces():
    async def main() -> list[float]:
        adaptive = AdaptiveLimit(16)
        adaptive.rate_known = True
        out = []
        for outcome in (LIMITED, Outcome(ok=False, overloaded=True)):
            await adaptive.acquire(ONE)
            adaptive.release(ONE, Outcome(**{**_fields(outcome),
                                             "started_seq": adaptive.next_seq()}))
            out.append(adaptive.limit)
        return out

    assert run(main()) == [16.0, 8.0]


def _fields(o: Outcome) -> dict[str, Any]:
    return {name: getattr(o, name) for name in o.__slots__}


def test_remaining_without_a_reset_keeps_every_minute_within_the_limit():
    # a gateway's fixed window (LiteLLM: remaining, no reset): after a burst of the whole
    # window, the bucket's steady refill would send on into a window that is empty
    async def main(reset: float | None) -> list[float]:
        rpm = RateLimit(150)
        times = []

        async def one() -> None:
            await rpm.acquire(ONE)
            times.append(now())
            left = max(0, 150 - len(times))
            rpm.release(ONE, Outcome(hints=RateHints(limit_requests=150,
                                                     remaining_requests=left,
                                                     reset_requests=reset)))

        for _ in range(300):
            await in_task(one)
        return times

    times = run(main(None))
    assert max(sum(1 for u in times if t <= u < t + 60) for t in times) <= 150
    assert times[149] < 1.0 and times[150] >= 60.0  # the window's burst, then the next minute
    stated = run(main(1.0))  # a reset stated: the provider refills as a bucket (no log)
    assert stated[150] < 60.0


def test_a_per_request_fn_is_neither_hedged_nor_cut():
    import polars as pl

    import dfbatch

    slow = {0}

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[int]:
        first = batch["id"][0]
        async with dfbatch.limits.request(tokens=1):
            await asyncio.sleep(50.0 if first in slow else 0.1)  # (its limits may hold it)
        return batch["id"].to_list()

    events: list[Any] = []
    df = pl.DataFrame({"id": range(400), "text": ["w"] * 400})
    out = run(dfbatch.aprocess(df, fn, encoding=lambda ts: [1] * len(ts), progress=False,
                               on_event=events.append, timeout=600.0))
    assert out["error"].is_null().all()
    kinds = {type(e).__name__ for e in events}
    assert "BatchHedged" not in kinds and "BatchRetried" not in kinds


def test_a_stated_fixed_window_is_kept_in_every_window_of_its_length():
    # RateLimit-Policy "s";q=5;w=1 over a bucket that would refill continuously: no second
    # (of sends, plus a small margin for arrival delays) holds more than 5
    async def main() -> list[float]:
        rpm = RateLimit(None)
        await in_task(lambda: _answered(rpm, RateHints(limit_requests=300, remaining_requests=4,
                                                       reset_requests=1, window_requests=1)))
        times = []
        for _ in range(40):
            await rpm.acquire(ONE)
            times.append(now())
        return times

    times = run(main())
    for i, t in enumerate(times):
        inside = [u for u in times[i:] if u < t + 1.0 + 0.01]
        assert len(inside) <= 5
    # 41 charges (the answered one first), 5 a window: the last opens the 9th window, not
    # sooner (what a continuous 5/s bucket of 5 would allow: 7.2 s) nor much later
    assert times[-1] == pytest.approx(8 * 1.01, abs=0.02)


def test_a_lone_429_under_a_stated_window_widens_the_margin_a_second_lowers_the_rate():
    async def main() -> list[tuple[float, float]]:
        rpm = RateLimit(None)
        hints = RateHints(limit_requests=300, remaining_requests=4, window_requests=1)
        await in_task(lambda: _answered(rpm, hints))
        seen = [(rpm.rate, rpm.log.margin_s)]
        await in_task(lambda: _limited(rpm))  # a window edge met early: margin x 2
        seen.append((rpm.rate, rpm.log.margin_s))
        await asyncio.sleep(1.0)
        await in_task(lambda: _limited(rpm))  # again within 10 s: the rate drops
        seen.append((rpm.rate, rpm.log.margin_s))
        return seen

    (r0, m0), (r1, m1), (r2, m2) = run(main())
    assert r0 == r1 == 5.0 and m1 == 2 * m0
    assert r2 == pytest.approx(5.0 * 0.7) and m2 == m1


async def _answered(limit: RateLimit, hints: RateHints, cost: Cost = ONE) -> None:
    await limit.acquire(cost)
    limit.release(cost, Outcome(hints=hints))


def test_the_429s_of_one_window_edge_lower_no_rate():
    # 8 calls a window released arrive a few ms early: each comes back 429. They were all sent
    # before the first of them came back: one edge, not a slower provider (helper-40's F1)
    async def main() -> tuple[float, float]:
        rpm = RateLimit(None)
        await in_task(lambda: _answered(rpm, RateHints(limit_requests=300, remaining_requests=4,
                                                       window_requests=1)))
        sent = [asyncio.Event() for _ in range(4)]
        go = asyncio.Event()

        async def edge(i: int) -> None:
            await rpm.acquire(ONE)
            sent[i].set()
            await go.wait()
            rpm.release(ONE, LIMITED)

        tasks = [asyncio.create_task(edge(i)) for i in range(4)]
        for e in sent:
            await e.wait()
        go.set()
        await asyncio.gather(*tasks)
        return rpm.rate, rpm.log.margin_s

    rate, margin = run(main())
    assert rate == 5.0 and margin == pytest.approx(0.02)  # widened once, not four times


def test_a_users_lower_rpm_under_a_stated_window_is_paced_by_the_bucket_not_rounded_down():
    # told rpm=90 (1.5/s), the provider states 1000 per 1 s: 1.5 a window would round down to
    # one request a second (helper-40's F2)
    async def main() -> float:
        rpm = RateLimit(90)
        await in_task(lambda: _answered(rpm, RateHints(limit_requests=60_000,
                                                       remaining_requests=999, window_requests=1)))
        t0 = now()
        for _ in range(30):
            await rpm.acquire(ONE)
        return now() - t0

    assert run(main()) == pytest.approx(30 / 1.5, rel=0.1)


def test_refused_sends_replayed_leave_no_debt_past_a_stated_window():
    # 3 per 10 s, a blind first wave of 8: 5 refused, then 3 answered. Replaying the refused 5
    # as charges left the bucket at -5: the next send waited ~30 s (helper-40's F4)
    def said(remaining: int) -> RateHints:
        return RateHints(limit_requests=18, remaining_requests=remaining, reset_requests=10,
                         window_requests=10)

    async def main() -> float:
        rpm = RateLimit(None)
        answer = [asyncio.Event() for _ in range(8)]

        async def call(i: int) -> None:
            await asyncio.sleep(0.015 * i)
            await rpm.acquire(ONE)
            await answer[i].wait()
            ok = i < 3
            rpm.release(ONE, Outcome(ok=ok, rate_limited=not ok, hints=said(max(0, 2 - i))))

        tasks = [asyncio.create_task(call(i)) for i in range(8)]
        await asyncio.sleep(0.2)
        for i in (3, 4, 5, 6, 7, 0, 1, 2):
            answer[i].set()
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        await rpm.acquire(ONE)
        return now()

    assert run(main()) <= 10.1  # the window's end (10 s after the first send), no later


def test_a_request_over_a_stated_windows_token_quota_is_known_too_large():
    async def main() -> float:
        tpm = RateLimit(None, tokens=True)
        hints = RateHints(limit_tokens=18_000, remaining_tokens=200, window_tokens=1)
        await in_task(lambda: _answered(tpm, hints, Cost(tokens=50)))
        return tpm.largest

    assert run(main()) == 300  # q=300 a second: a 616-token request can never go


def test_widening_starts_over_after_a_quiet_minute():
    from dfbatch.execute._journal import MARGIN_S, ChargeLog

    log = ChargeLog()
    log.open_window(0.0, 1.0, 5.0)
    log.widen(0.0)
    log.widen(5.0)
    assert log.margin_s == pytest.approx(4 * MARGIN_S)
    log.widen(100.0)  # another client's lone 429 much later: no ratchet
    assert log.margin_s == pytest.approx(2 * MARGIN_S)


async def _acquired(limit: RateLimit) -> None:
    await limit.acquire(ONE)
