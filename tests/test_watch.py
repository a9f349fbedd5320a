"""One timer for every call's timeout (``execute._watch.Watch``): same semantics as
``asyncio.timeout`` per call — a call past its deadline raises ``TimeoutError``, a cancel from
anyone else stays a cancel, and a call that ended in time never gets a stray cancel."""

from __future__ import annotations

import asyncio

import pytest

from dfbatch.execute._watch import Watch


def test_only_the_calls_past_their_deadline_time_out() -> None:
    async def main() -> list[object]:
        watch = Watch(0.1)

        async def call(s: float) -> object:
            try:
                return await watch.run(asyncio.sleep(s, result=s))
            except TimeoutError:
                return "timeout"

        return await asyncio.gather(*(call(s) for s in (0.01, 0.05, 0.3, 0.5, 0.02)))

    assert asyncio.run(main()) == [0.01, 0.05, "timeout", "timeout", 0.02]


def test_a_cancel_from_outside_stays_a_cancel() -> None:
    async def main() -> None:
        watch = Watch(10.0)
        task = asyncio.ensure_future(watch.run(asyncio.sleep(5)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_call_that_ends_as_the_timer_fires_keeps_no_cancel() -> None:
    async def main() -> str:
        watch = Watch(0.05)
        loop = asyncio.get_running_loop()

        async def ends_with_the_deadline() -> str:
            fut: asyncio.Future[str] = loop.create_future()
            # resolved in the same loop pass as the watch's timer: the answer may be lost to
            # the timeout (as under asyncio.timeout), but the task must not stay cancelled
            loop.call_at(loop.time() + 0.05, fut.set_result, "answered")
            try:
                return await watch.run(fut)
            except TimeoutError:
                return "timeout"

        got = await ends_with_the_deadline()
        await asyncio.sleep(0.01)  # a stray cancel would hit here
        return got

    assert asyncio.run(main()) in ("answered", "timeout")


def test_many_expiring_calls_cost_one_timer_pass_per_grain() -> None:
    async def main() -> tuple[int, int]:
        watch = Watch(0.05)
        checks = 0
        check = watch._check

        def counted() -> None:
            nonlocal checks
            checks += 1
            check()

        watch._check = counted  # type: ignore[method-assign]

        async def call(i: int) -> bool:
            await asyncio.sleep(i * 0.0001)
            try:
                await watch.run(asyncio.sleep(1))
            except TimeoutError:
                return True
            return False

        timed_out = sum(await asyncio.gather(*(call(i) for i in range(200))))
        return timed_out, checks

    timed_out, checks = asyncio.run(main())
    assert timed_out == 200
    assert checks <= 25  # 200 deadlines 0.1 ms apart, over ~20 ms: a handful of passes
