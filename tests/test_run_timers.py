"""A run leaves no timer of its own on the event loop: every ``call_later`` / ``call_at`` it
armed (the warm-up's opening, the shared call timeout, the hedging decisions, the breaker's
stall clock) is cancelled when ``aprocess`` returns or raises, however the run ended."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.errors import RunStoppedError

QUIET: dict[str, Any] = {"progress": False, "items_per_batch": 2}


def _frame(n: int = 12) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [f"row {i}" for i in range(n)]})


def _ours(handle: asyncio.TimerHandle) -> bool:
    callback = handle._callback  # type: ignore[attr-defined]  (asyncio's own field)
    module = getattr(callback, "__module__", None) or type(callback).__module__
    return isinstance(module, str) and module.startswith("dfbatch")


def _pending_timers(loop: asyncio.AbstractEventLoop) -> list[str]:
    """dfbatch's timers still armed on ``loop`` (asyncio's private heap: acceptable here)."""
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    return [getattr(h._callback, "__qualname__", repr(h._callback))  # type: ignore[attr-defined]
            for h in scheduled if not h.cancelled() and _ours(h)]


async def _answers(batch: pl.DataFrame) -> list[int]:
    await asyncio.sleep(0.001)
    return batch["id"].to_list()


class _BadKey(Exception):
    status_code = 401  # account-wide: the run stops at once (fatal)


async def _refused(batch: pl.DataFrame) -> list[int]:
    await asyncio.sleep(0.001)
    msg = "invalid api key"
    raise _BadKey(msg)


class _ConnectError(Exception):
    """Named as httpx's: an outage (transient), which starts the breaker's stall clock."""


_ConnectError.__name__ = "ConnectError"


async def _unreachable(batch: pl.DataFrame) -> list[int]:
    await asyncio.sleep(0.001)
    msg = "connection refused"
    raise _ConnectError(msg)


def _run(scenario: Any) -> list[str]:
    async def main() -> list[str]:
        await scenario()
        return _pending_timers(asyncio.get_running_loop())

    return asyncio.run(main())


@pytest.mark.parametrize("hedge_after", [None, 0.9])
def test_a_run_that_ends_normally_leaves_no_timer(hedge_after: float | None) -> None:
    async def scenario() -> None:
        out = await dfbatch.aprocess(_frame(), _answers, timeout=30.0, hedge_after=hedge_after,
                                     **QUIET)
        assert out["error"].null_count() == 12

    assert _run(scenario) == []


def test_a_run_stopped_by_a_fatal_error_leaves_no_timer() -> None:
    async def scenario() -> None:
        with pytest.raises(RunStoppedError):
            await dfbatch.aprocess(_frame(), _refused, timeout=30.0, **QUIET)

    assert _run(scenario) == []


def test_a_run_whose_calls_fail_with_an_outage_leaves_no_timer() -> None:
    async def scenario() -> None:  # (the breaker's stall clock: outage_timeout, 600 s)
        out = await dfbatch.aprocess(_frame(4), _unreachable, timeout=30.0, max_attempts=1,
                                     **QUIET)
        assert out["error"].null_count() == 0

    assert _run(scenario) == []


def test_a_run_cancelled_mid_run_leaves_no_timer() -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def stuck(batch: pl.DataFrame) -> list[int]:
            started.set()
            await asyncio.sleep(60)
            return batch["id"].to_list()

        run = asyncio.create_task(dfbatch.aprocess(_frame(), stuck, timeout=30.0, **QUIET))
        await started.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    assert _run(scenario) == []


def test_a_streamed_run_leaves_no_timer(tmp_path: Path) -> None:
    async def scenario() -> None:  # (its limits are shared by the chunks' pools)
        summary = await dfbatch.aprocess(_frame(), _answers, out=tmp_path / "out.parquet",
                                         chunk_rows=5, timeout=30.0, **QUIET)
        assert summary["rows_ok"].item() == 12
        with pytest.raises(RunStoppedError):  # (no answer: the warm-up never opened)
            await dfbatch.aprocess(_frame(), _refused, out=tmp_path / "refused.parquet",
                                   chunk_rows=5, timeout=30.0, **QUIET)

    assert _run(scenario) == []
