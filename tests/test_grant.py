"""One attempt's hold (``Grant``: agent bytes, the run's limits, the breaker's pass) and the
warm-up that leaves the stack once warm: what can pay at once is taken without a coroutine,
what must wait waits in the same order, and no path leaks a unit (virtual clock)."""

from __future__ import annotations

import asyncio
from collections import Counter

import polars as pl
import pytest

import dfbatch
from benchmarks.simapi import SimAPI, SimConfig, Workload, run
from dfbatch.config import BatchConfig
from dfbatch.errors import NoProgressError
from dfbatch.execute._attempt import Grant
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._limits import CapacityLimit, Cost, Limits, Outcome
from dfbatch.execute._stack import RunLimits, WarmUp

COST = Cost(tokens=10, nbytes=10)


def _parts(slots: int = 1, nbytes: int = 100) -> tuple[CapacityLimit, CapacityLimit, Limits]:
    byte_cap, slot_cap = CapacityLimit(nbytes, lambda c: c.nbytes), CapacityLimit(slots)
    return byte_cap, slot_cap, Limits([slot_cap])


def test_try_enter_takes_everything_at_once_and_release_gives_it_all_back() -> None:
    async def main() -> tuple[bool, float, float, bool, float, float]:
        byte_cap, slot_cap, stack = _parts()
        breaker = Breaker()
        grant = Grant(stack, COST, byte_cap, breaker)
        took = grant.try_enter()
        held = (slot_cap.in_use, byte_cap.in_use)
        grant.ticket.record("ok")
        grant.release()
        grant.release()  # (a second release gives nothing back twice)
        return took, *held, breaker.last_ok > 0, slot_cap.in_use, byte_cap.in_use

    assert run(main()) == (True, 1.0, 10.0, True, 0.0, 0.0)


@pytest.mark.parametrize("blocked", ["bytes", "limits"])
def test_a_cancelled_enter_leaks_nothing(blocked: str) -> None:
    async def main() -> tuple[float, float]:
        byte_cap, slot_cap, stack = _parts(nbytes=10 if blocked == "bytes" else 100)
        first = Grant(stack, COST, byte_cap, None)
        assert first.try_enter()
        second = Grant(stack, COST, byte_cap, None)
        assert not second.try_enter()
        waiting = asyncio.ensure_future(second.enter())
        await asyncio.sleep(1.0)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        first.release()
        return slot_cap.in_use, byte_cap.in_use

    assert run(main()) == (0.0, 0.0)


def test_a_waiting_grant_is_served_before_a_later_try() -> None:
    async def main() -> list[str]:
        byte_cap, _, stack = _parts()
        order: list[str] = []
        first = Grant(stack, COST, byte_cap, None)
        assert first.try_enter()

        async def waiter() -> None:
            grant = Grant(stack, COST, byte_cap, None)
            if not grant.try_enter():
                await grant.enter()
            order.append("waiter")
            grant.release()

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.1)
        first.release()  # the slot goes to the waiter, not to the try below
        late = Grant(stack, COST, byte_cap, None)
        order.append("late" if late.try_enter() else "late waits")
        await task
        return order

    assert run(main()) == ["late waits", "waiter"]


def test_an_open_breaker_holds_the_limits_until_the_probe_then_a_stop_frees_them() -> None:
    async def main() -> tuple[float, float, float, float]:
        byte_cap, slot_cap, stack = _parts(slots=4)
        breaker = Breaker(threshold=1, first_s=5.0)
        breaker.record(await breaker.wait(), "outage")  # open: the next probe at t + 5 s
        t0 = asyncio.get_running_loop().time()
        probe = Grant(stack, COST, byte_cap, breaker)
        assert not probe.try_enter()
        waiting = asyncio.ensure_future(probe.enter())
        await asyncio.sleep(1.0)
        held_while_waiting = slot_cap.in_use
        await waiting
        waited = asyncio.get_running_loop().time() - t0
        probe.ticket.record("outage")  # still down: the next probe 10 s later
        probe.release()
        other = Grant(stack, COST, byte_cap, breaker)
        assert not other.try_enter()
        stopped = asyncio.ensure_future(other.enter())
        await asyncio.sleep(0)
        breaker.stop(NoProgressError("no progress", cause="outage"))
        with pytest.raises(NoProgressError):
            await stopped
        return held_while_waiting, round(waited, 3), slot_cap.in_use, byte_cap.in_use

    assert run(main()) == (1.0, 5.0, 0.0, 0.0)


def test_the_warm_up_leaves_the_stack_once_warm_and_a_hold_from_before_still_releases() -> None:
    async def main() -> tuple[bool, bool, float, float]:
        limits = RunLimits.from_config(BatchConfig(items_per_batch=4), n_agents=2)
        warm = next(lim for lim in limits.shared.limits if isinstance(lim, WarmUp))
        early, first = limits.shared.hold(COST), limits.shared.hold(COST)
        await early.__aenter__()
        await first.__aenter__()
        first.outcome = Outcome(True)
        first.release()  # the first answer: warm
        in_stack = warm in limits.shared.limits
        early.outcome = Outcome(True)
        early.release()  # taken while warming up: released without the warm-up
        slots = limits.shared.limits[0]
        assert isinstance(slots, CapacityLimit)
        return warm.warm, in_stack, slots.in_use, limits.agent_bytes[0].in_use

    assert run(main()) == (True, False, 0.0, 0.0)


def test_an_acquire_waiting_when_a_limit_is_dropped_completes_over_its_own_list() -> None:
    async def main() -> tuple[float, float, float]:
        warm, slots = WarmUp(1), CapacityLimit(1)
        stack = Limits([slots, warm.leave_when_warm(Limits([])), CapacityLimit(5)])
        warm.leave_when_warm(stack)
        first = stack.hold(COST)
        await first.__aenter__()
        second = asyncio.ensure_future(stack.hold(COST).__aenter__())
        await asyncio.sleep(0)
        first.outcome = Outcome(True)
        first.release()  # warm: dropped from the stack while the second waits on its slot
        held = await second
        last = stack.limits[-1]
        assert isinstance(last, CapacityLimit) and len(stack.limits) == 2
        in_use = last.in_use
        held.release()
        return slots.in_use, in_use, last.in_use

    assert run(main()) == (0.0, 1.0, 0.0)


def test_an_unrecorded_probe_is_freed_at_release_for_the_next_call() -> None:
    async def main() -> tuple[bool, float]:
        byte_cap, _, stack = _parts(slots=4)
        breaker = Breaker(threshold=1, first_s=5.0)
        breaker.record(await breaker.wait(), "outage")
        probe = Grant(stack, COST, byte_cap, breaker)
        await probe.enter()
        probe.release()  # cancelled before it said anything: no answer, no outage
        t0 = asyncio.get_running_loop().time()
        other = Grant(stack, COST, byte_cap, breaker)
        await other.enter()
        got = other.ticket.ticket
        other.release()
        return got is not None and got.probe, asyncio.get_running_loop().time() - t0

    assert run(main()) == (True, 0.0)


def test_the_warm_up_ramps_its_cap_until_it_opens_without_an_answer() -> None:
    """No answer yet: 2 sends, 4 after 0.25 s, 8 after 0.5 s ... open at 1 s (virtual clock);
    an answer opens it at once, and the ramp's timer is cancelled with it."""

    async def main() -> tuple[list[tuple[float, int]], bool, bool]:
        loop = asyncio.get_running_loop()
        warm = WarmUp(2, open_after_s=1.0, ramp_s=0.25)
        stack = Limits([warm.leave_when_warm(Limits([]))])
        started: list[float] = []

        async def send() -> None:
            await stack.hold(COST).__aenter__()  # held: no answer comes back
            started.append(loop.time())

        t0 = loop.time()
        tasks = [asyncio.ensure_future(send()) for _ in range(40)]
        await asyncio.sleep(1.1)
        steps = sorted(Counter(round(t - t0, 2) for t in started).items())
        # an answer opens a fresh warm-up at once; its pending doubling is cancelled
        other = WarmUp(2, open_after_s=1.0, ramp_s=0.25)
        first = Limits([other]).hold(COST)
        await first.__aenter__()
        first.outcome = Outcome(True)
        first.release()
        timer = other._timer
        for t in tasks:
            t.cancel()
        return steps, other.warm, timer is not None and timer.cancelled()

    steps, warm, cancelled = run(main())
    # 2 at once, then 2 more, 4 more, 8 more (16 in flight) and everything at 1 s
    assert steps == [(0.0, 2), (0.25, 2), (0.5, 4), (0.75, 8), (1.0, 24)]
    assert warm and cancelled


def test_a_bad_key_costs_the_first_sends_only_while_the_ramp_has_not_doubled() -> None:
    """Every call a fast 401 (50 ms): the run stops after the warm-up's first sends (2 per
    agent), not after the ramp's later ones."""
    api = SimAPI(SimConfig(bad_key=True), Workload.make(200, mean_tokens=50.0, seed=0))

    async def fn(batch: pl.DataFrame) -> list[str]:
        return (await api.call(batch["id"].to_list())).outputs

    df = pl.DataFrame({"id": list(range(200)), "text": ["a b c"] * 200})

    async def main() -> None:
        await dfbatch.aprocess(df, fn, text="text", agents=4, max_concurrent_batches=8,
                               progress=False)

    with pytest.raises(dfbatch.RunStoppedError):
        run(main())
    assert 1 <= api.stats.calls <= 8
