"""A Batch API run's jobs in the events, the terminal bar and the notebook dashboard."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import dfbatch
from dfbatch.events import Event, RunStats, fold
from dfbatch.job_events import JobUpdated, jobs_eta
from dfbatch.llm import chat
from dfbatch.llm.batch_api import BatchLimits
from dfbatch.sim import serve

pytest.importorskip("openai")
PRICE = (0.00015, 0.0006)  # USD per 1,000 tokens, as gpt-4o-mini


def run_jobs(tmp_path: Path, **kw: object) -> tuple[pl.DataFrame, list[Event]]:
    df = pl.DataFrame({"text": [f"Row number {i} of the table." for i in range(30)]})
    events: list[Event] = []
    with serve(time_scale=0.001, batch_completion_s=1_500) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=BatchLimits(max_requests=10, poll_s=0.01, poll_max_s=0.02))
        fn.dfbatch_price = PRICE  # type: ignore[attr-defined]  # the simulator's model, priced
        out = dfbatch.process(df, fn, checkpoint=tmp_path, on_event=events.append, **kw)
    return out, events


def test_each_job_reaches_the_events_with_its_counts_eta_and_savings(tmp_path: Path) -> None:
    out, events = run_jobs(tmp_path, progress=False)
    updates = [e for e in events if isinstance(e, JobUpdated)]
    running = [u for u in updates if u.status == "in_progress" and 0 < u.done < u.rows]
    assert running and all(u.eta_s is not None and u.eta_s > 0 for u in running)
    etas = [fold(events[: events.index(u) + 1]).eta_s for u in running]
    assert any(e is not None and e > 0 for e in etas)  # the overall ETA, from the counts
    mid = fold(events[: events.index(running[-1]) + 1])
    assert mid.eta_s == jobs_eta(mid.jobs) and mid.rows_done < 30
    assert mid.rows_shown == mid.rows_done + sum(j.done for j in mid.jobs if not j.collected)
    assert mid.rows_shown > mid.rows_done  # the bar moves with the provider's counts
    final = fold(events)
    assert [(j.job, j.status, j.completed, j.failed) for j in final.jobs] == [
        (k, "completed", 10, 0) for k in range(3)]
    full = (final.input_tokens * PRICE[0] + final.output_tokens * PRICE[1]) / 1000
    assert final.saved_usd == pytest.approx(full * 0.5)  # half price: half saved
    assert final.rows_shown == 30 and all(j.collected for j in final.jobs)
    assert final.input_tokens > 0 and out["error"].null_count() == 30


def test_the_terminal_bar_shows_the_jobs_and_lists_them_at_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_jobs(tmp_path, progress="bar")
    err = capsys.readouterr().err
    assert "jobs: 3 completed" in err and "saved $" in err
    assert err.count("10 ok / 0 failed of 10") == 3  # one line per job under the bar
    assert "dfbatch: batch job" not in err  # the bar replaces the status lines


def test_the_eta_is_unknown_while_files_wait_for_room_under_the_token_limit() -> None:
    jobs = (JobUpdated(0.0, 0, "batch_a", "in_progress", 10, 5, 0, 30.0),)
    assert RunStats(total_batches=1, jobs=jobs).eta_s == 30.0
    assert RunStats(total_batches=2, jobs=jobs).eta_s is None  # one file not submitted yet


def test_the_dashboard_has_a_jobs_table() -> None:
    pytest.importorskip("ipywidgets")
    from dfbatch.display.widget import WidgetDisplay

    w = WidgetDisplay(20, show=False, figure=False)
    jobs = (JobUpdated(0.0, 0, "batch_a", "completed", 10, 10, 0, None, 0.002),
            JobUpdated(0.0, 1, "batch_b", "in_progress", 10, 4, 0, 30.0))
    assert w.jobs.value == "" and w.jobs.layout.display == "none"  # no jobs, no table
    w.update(RunStats(total_rows=20, total_batches=2, elapsed_s=5.0, jobs=jobs))
    assert "batch_b" in w.jobs.value and "in_progress" in w.jobs.value
    assert w.jobs.layout.display == "block"
    w.close(RunStats(total_rows=20, total_batches=2, rows_done=10, elapsed_s=6.0,
                     finished=True, jobs=jobs))
    assert "batch_a" in w.jobs.value and "batch_b" in w.jobs.value
    assert "ETA 0:30" in w.jobs.value and "saved $0.0020" in w.jobs.value
    assert "saved (Batch API)" in w.header.value
