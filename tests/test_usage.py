"""``report_usage``: what a call reports is counted the same by the live view, the events and
their fold; a report after the call returned (a task that outlived it) is counted nowhere."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import polars as pl
import pytest

import dfbatch
import dfbatch.display
from dfbatch.errors import LateUsageWarning
from dfbatch.events import BatchFinished, Event, RunStats, fold
from dfbatch.execute import _usage


def _run(fn: Any, monkeypatch: pytest.MonkeyPatch, n: int = 12) -> tuple[
        pl.DataFrame, RunStats, list[Event]]:
    """Run ``fn`` over ``n`` rows in batches of 2 on one agent, with a live view: the result,
    the view's last ``RunStats`` and the events."""
    from tests.fakes import RecordingView

    view = RecordingView()
    monkeypatch.setattr(dfbatch.display, "open_display", lambda progress, **kw: view)
    events: list[Event] = []
    df = pl.DataFrame({"id": range(n), "text": [f"t{i}" for i in range(n)]})
    out = dfbatch.process(df, fn, items_per_batch=2, agents=1, progress="bar",
                          on_event=events.append)
    return out, view.shown[-1], events


def _told(events: list[Event]) -> tuple[int, int]:
    done = [ev for ev in events if isinstance(ev, BatchFinished)]
    return sum(ev.input_tokens for ev in done), sum(ev.output_tokens for ev in done)


def test_usage_reported_before_fn_returns_counts_alike_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def report(n: int) -> None:
        await asyncio.sleep(0)
        dfbatch.report_usage(input_tokens=10 * n, output_tokens=n)

    async def fn(batch: pl.DataFrame) -> list[int]:
        await asyncio.create_task(report(batch.height))  # a task fn awaits: on time
        return batch["id"].to_list()

    out, live, events = _run(fn, monkeypatch)
    assert out["error"].null_count() == out.height
    replayed = fold(events)
    assert (live.input_tokens, live.output_tokens) == (120, 12)
    assert (replayed.input_tokens, replayed.output_tokens) == (120, 12)
    assert _told(events) == (120, 12)


def test_usage_reported_after_fn_returned_counts_nowhere_and_warns_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each call reports 10 tokens a row in time, and starts a task that reports 5 more once
    the next call has begun (so after this call's answer is recorded, while the live view has
    not folded it yet)."""
    gates: list[asyncio.Event] = []
    late: list[asyncio.Task[None]] = []

    async def report_later(gate: asyncio.Event, n: int) -> None:
        await gate.wait()
        dfbatch.report_usage(input_tokens=5 * n)

    async def fn(batch: pl.DataFrame) -> list[int]:
        if gates:
            gates[-1].set()  # the previous call's late report goes now
        dfbatch.report_usage(input_tokens=10 * batch.height, output_tokens=batch.height)
        if batch["id"][0] < 10:  # (the last call leaves no task behind)
            gates.append(asyncio.Event())
            late.append(asyncio.create_task(report_later(gates[-1], batch.height)))
        return batch["id"].to_list()

    with pytest.warns(LateUsageWarning, match="before fn returns") as caught:
        out, live, events = _run(fn, monkeypatch)
    assert len(late) == 5 and all(t.done() for t in late)  # every late report was made
    assert len([w for w in caught if w.category is LateUsageWarning]) == 1  # once a run
    assert out["output"].to_list() == list(range(12))
    replayed = fold(events)
    # on-time reports only, in the live view, the events and their fold alike
    assert (live.input_tokens, live.output_tokens) == (120, 12)
    assert (replayed.input_tokens, replayed.output_tokens) == (120, 12)
    assert _told(events) == (120, 12)


def test_a_closed_usage_ignores_reports_and_each_run_warns_once() -> None:
    for _ in range(2):  # two runs: each warns once
        used, token = _usage.begin(_usage.LateReports())
        dfbatch.report_usage(input_tokens=3, output_tokens=1)
        kept = contextvars.copy_context()  # (what a task started by the call keeps)
        _usage.end(token, used)
        assert used.closed
        with pytest.warns(LateUsageWarning):
            kept.run(dfbatch.report_usage, input_tokens=7)
        kept.run(dfbatch.report_usage, input_tokens=7)  # told once a run: no second warning
        assert (used.input_tokens, used.output_tokens) == (3, 1)
    dfbatch.report_usage(input_tokens=7)  # outside any call: nothing, no warning


@pytest.mark.parametrize("bad", [None, -1, float("nan"), float("inf"), "12", True])
def test_report_usage_refuses_a_count_that_is_not_tokens(bad: object) -> None:
    """A bad count is dfbatch misused inside fn, the same on every call: the run stops at its
    first call with an error naming the argument and the fix (no retry, no bisection, no wrong
    total), its partial result kept."""
    calls = []

    def fn(batch: pl.DataFrame) -> list[str]:
        calls.append(batch.height)
        dfbatch.report_usage(input_tokens=bad)  # type: ignore[arg-type]
        return ["ok"] * batch.height

    df = pl.DataFrame({"text": [f"t{i}" for i in range(40)]})
    with pytest.raises(dfbatch.RunStoppedError, match=r"report_usage\(input_tokens=") as info:
        dfbatch.process(df, fn, progress=False, agents=1, max_concurrent_batches=1)
    assert "int >= 0" in str(info.value) and len(calls) == 1
    assert info.value.partial.height == 40
