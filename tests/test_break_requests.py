"""dfbatch.limits.request() misused, broken on purpose: each test pins a fix (its docstring)."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest

import dfbatch

QUIET = {"progress": False, "hedge_after": None}


class _Refused(Exception):
    status_code = 401


def test_a_request_nested_in_a_request_does_not_wait_for_its_own_probe() -> None:
    """A per-request fn wrapping an adapter's request in one of its own (nested requests):
    during an outage the outer request went out as the breaker's one probe and the inner one
    waited for the breaker, i.e. for that probe: the run sat there until outage_timeout
    (600 s) and stopped, though the service was back after 5 s."""
    from benchmarks.simapi import run

    sent: list[float] = []

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        loop = asyncio.get_running_loop()
        out = []
        for text in batch["text"].to_list():
            async with dfbatch.limits.request(tokens=10), dfbatch.limits.request(tokens=10):
                sent.append(loop.time())
                await asyncio.sleep(0.1)
                if loop.time() < 5:
                    msg = "connection refused"
                    raise ConnectionError(msg)
                out.append(text.upper())
        return out

    async def main() -> tuple[pl.DataFrame, float]:
        loop = asyncio.get_running_loop()
        df = pl.DataFrame({"text": [f"row {i}" for i in range(20)]})
        out = await dfbatch.aprocess(df, fn, items_per_batch=1, rpm=600, **QUIET)
        return out, loop.time()

    out, ended = run(main())
    assert out["error"].null_count() == 20
    assert out["output"].to_list() == [f"ROW {i}" for i in range(20)]
    assert ended < 30  # (the breaker's probes: back within seconds of the service)


def test_a_refusal_inside_a_nested_request_still_stops_the_run() -> None:
    """The inner request of a nested pair passes the breaker with the outer one, but its
    refusal must still stop the run (no request goes out after it)."""
    from benchmarks.simapi import run

    sent: list[str] = []

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        out = []
        for text in batch["text"].to_list():
            async with dfbatch.limits.request(), dfbatch.limits.request():
                sent.append(text)
                await asyncio.sleep(0.01)
                if text == "row 0":
                    msg = "Incorrect API key provided"
                    raise _Refused(msg)
                out.append(text.upper())
        return out

    async def main() -> None:
        df = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})
        with pytest.raises(dfbatch.RunStoppedError, match="API key was refused"):
            await dfbatch.aprocess(df, fn, items_per_batch=4, agents=1, **QUIET)

    run(main())
    assert len(sent) < 40
