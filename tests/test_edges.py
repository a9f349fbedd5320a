"""Trust at the edges (issue 15): honest cost, null texts not paid for, plans not ignored."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.events import StatsAccumulator
from dfbatch.llm import chat, prices

DOCS = pl.DataFrame({
    "title": [f"doc {i}" for i in range(24)],
    "text": [("Polars is a fast DataFrame library written in Rust. " * (1 + i % 5)).strip()
             for i in range(24)],
})


# -- item 1: the estimate prices what process sends ------------------------------------------
@pytest.mark.parametrize("mode", ["per_row", "batch"])
def test_summary_with_fn_prices_template_system_and_output_cap(sim: Any, mode: str) -> None:
    fn = chat("sim-chat", "Summarize the document titled {title} in one line:\n{text}",
              system="You are a careful technical writer. " * 8, max_tokens=48, mode=mode,
              base_url=sim.url)
    planned = DOCS.batch.plan(fn=fn, agents=2)
    bare = planned.batch.summary(agents=2, price_in_per_1k=1.0, price_out_per_1k=1.0)
    s = planned.batch.summary(fn=fn, agents=2, price_in_per_1k=1.0, price_out_per_1k=2.0)
    acc = StatsAccumulator()
    dfbatch.process(planned, fn, progress=False, on_event=acc.apply, agents=2)
    used = acc.snapshot()
    # input: the prompt as the provider counts it, within 10% of what the run really sent
    assert s.tokens_in == pytest.approx(used.input_tokens, rel=0.10)
    assert bare.tokens_in < 0.7 * used.input_tokens  # the old estimate: texts only
    # output: the cap, never below what was produced
    assert s.tokens_out >= used.output_tokens
    per_row = 48 + (12 if mode == "batch" else 0)
    assert s.tokens_out >= per_row * DOCS.height
    assert s.cost_in == pytest.approx(s.tokens_in / 1000)
    assert s.cost_out == pytest.approx(s.tokens_out / 1000 * 2.0)
    assert "fn's prompt, system message and max_tokens" in str(s)


def test_plan_with_fn_uses_its_output_tokens() -> None:
    fn = chat("sim-chat", max_tokens=100, base_url="http://127.0.0.1:9")
    planned = DOCS.batch.plan(fn=fn, agents=1, token_limit=300)
    plain = DOCS.batch.plan(agents=1, token_limit=300)
    assert planned["batch_id"].n_unique() > plain["batch_id"].n_unique()
    # an explicit output_tokens_per_row still wins
    assert DOCS.batch.plan(fn=fn, agents=1, token_limit=300, output_tokens_per_row=0).equals(
        plain)


def test_missing_price_is_said_not_printed_as_zero() -> None:
    planned = DOCS.batch.plan(agents=1)
    fn = chat("sim-chat", max_tokens=10, base_url="http://127.0.0.1:9")
    s = planned.batch.summary(fn=fn)
    assert s.cost is None and s.cost_in is None
    text = str(s)
    assert "$0.0000" not in text
    assert "no price; pass price_in_per_1k= and price_out_per_1k=" in text
    half = planned.batch.summary(fn=fn, price_in_per_1k=0.5)
    assert half.cost is None
    assert "for input only; pass price_out_per_1k=" in str(half)
    assert "$0.0000" not in str(half)


def test_known_model_is_priced_from_the_list() -> None:
    planned = DOCS.batch.plan(agents=1)
    fn = chat("gpt-4o-mini", max_tokens=10, api_key="sk-test", base_url="http://127.0.0.1:9")
    s = planned.batch.summary(fn=fn)
    p_in, p_out = prices.of("gpt-4o-mini")  # type: ignore[misc]
    assert s.cost_in == pytest.approx(s.tokens_in / 1000 * p_in)
    assert s.cost_out == pytest.approx(s.tokens_out / 1000 * p_out)
    assert "est. cost: up to $" in str(s)


# -- item 2: null and empty texts get an error value without a call --------------------------
def _count_calls() -> tuple[list[list[Any]], Any]:
    seen: list[list[Any]] = []

    def fn(batch: pl.DataFrame) -> list[int]:
        seen.append(batch["text"].to_list())
        return [len(t) for t in batch["text"]]  # crashes on None

    return seen, fn


def test_null_and_empty_texts_are_not_sent_by_default() -> None:
    df = pl.DataFrame({"text": ["abc", None, "de", "", "fghi"]})
    seen, fn = _count_calls()
    out = dfbatch.process(df, fn, progress=False, agents=1, items_per_batch=8)
    assert [t for call in seen for t in call] == ["abc", "de", "fghi"]
    assert out["output"].to_list() == [3, None, 2, None, 4]
    errors = out["error"].to_list()
    assert errors[0] is None and errors[2] is None and errors[4] is None
    assert errors[1].startswith("null_text") and errors[3].startswith("null_text")
    assert "send_null=True" in errors[1]
    assert out["attempts"].to_list()[1] == 0


def test_send_null_opt_in_sends_them() -> None:
    df = pl.DataFrame({"text": ["abc", "", "de"]})
    seen, fn = _count_calls()
    out = dfbatch.process(df, fn, progress=False, agents=1, items_per_batch=8, send_null=True)
    assert sorted(t for call in seen for t in call) == ["", "abc", "de"]
    assert out["output"].to_list() == [3, 0, 2]
    assert out["error"].null_count() == 3


def test_summary_does_not_price_null_rows() -> None:
    df = pl.DataFrame({"text": ["hello world", None, ""]})
    planned = df.batch.plan(agents=1)
    s = planned.batch.summary(price_in_per_1k=1.0, price_out_per_1k=1.0, output_tokens_per_row=5)
    assert (s.null_text, s.tokens_in, s.tokens_out) == (2, 2, 5)
    sent = planned.batch.summary(price_in_per_1k=1.0, price_out_per_1k=1.0,
                                 output_tokens_per_row=5, send_null=True)
    assert sent.tokens_out == 15


# -- item 3: plan settings passed to process on a planned frame ------------------------------
def _lengths(batch: pl.DataFrame) -> list[int]:
    return [len(t) for t in batch["text"]]


def test_process_replans_a_planned_frame_under_other_plan_settings() -> None:
    df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
    planned = df.batch.plan(items_per_batch=6, agents=1)
    with pytest.warns(dfbatch.ReplanWarning) as caught:
        out = planned.batch.process(_lengths, progress=False, items_per_batch=2, agents=3)
    text = str(caught[0].message)
    assert "2 batches of up to 6 rows over 1 agents" in text  # the plan that was in force
    assert "re-planned: 6 batches of up to 2 rows over 3 agents" in text
    assert "agents, items_per_batch" in text
    assert caught[0].filename == __file__
    assert out["batch_id"].n_unique() == 6
    assert out.group_by("run_batch_id").len()["len"].max() == 2


def test_process_keeps_a_plan_the_settings_agree_with() -> None:
    df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
    planned = df.batch.plan(items_per_batch=2, agents=2)
    out = planned.batch.process(_lengths, progress=False, items_per_batch=2, agents=2,
                                timeout=30)  # no warning (filterwarnings=error)
    assert out["batch_id"].to_list() == planned["batch_id"].to_list()
    out = planned.batch.process(_lengths, progress=False, timeout=30)  # no plan settings
    assert out["batch_id"].n_unique() == 6


def test_process_refuses_when_the_planned_text_is_gone() -> None:
    df = pl.DataFrame({"doc": [f"row {i}" for i in range(12)]})
    planned = df.batch.plan("doc", items_per_batch=6, agents=1).rename({"doc": "body"})
    with pytest.raises(dfbatch.ConfigError, match=r"already planned \(2 batches of up to 6 rows"):
        planned.batch.process(lambda b: b["body"], "doc", progress=False, items_per_batch=2)


# -- item 5: PartialResultWarning points at the user's line ----------------------------------
def test_partial_result_warning_points_at_the_callers_line() -> None:
    import asyncio
    import os
    import signal

    async def fn(batch: pl.DataFrame) -> list[int]:
        if batch["id"][0] == 0:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the run stops
        await asyncio.sleep(0 if batch["id"][0] == 0 else 30)
        return batch["id"].to_list()

    df = pl.DataFrame({"id": range(16), "text": ["x"] * 16})
    with pytest.warns(dfbatch.PartialResultWarning) as caught:
        out = df.batch.process(fn, progress=False, agents=2, items_per_batch=2)
    assert caught[0].filename == __file__, caught[0].filename
    assert (out["error"] == "cancelled").sum() > 0


# -- items 5, 6, 8: what the views say after Stop, on resume, while waiting on a straggler ----
def _events_with_a_straggler() -> list[Any]:
    from dfbatch.events import BatchFinished, BatchStarted, RunStarted

    evs: list[Any] = [RunStarted(0.0, 400, 100, 1000, (1000,))]
    for b in range(100):
        evs.append(BatchStarted(0.0, b, 0, 0, 4, 10, 1))
    for b in range(99):
        evs.append(BatchFinished(1.0, b, 0, 0, 4, 10, 1.0, 4, 0))
    return evs


def test_a_straggler_is_not_shown_as_100_percent_and_its_age_is_shown() -> None:
    import io

    from dfbatch.display.console import ConsoleDisplay
    from dfbatch.display.widget import WidgetDisplay

    acc = StatsAccumulator()
    for ev in _events_with_a_straggler():
        acc.apply(ev)
    stats = acc.snapshot(now=26.0)
    assert stats.rows_done == 396 and stats.in_flight == 1
    assert stats.percent_done == 99
    assert stats.oldest_in_flight_s == pytest.approx(26.0)
    out = io.StringIO()
    bar = ConsoleDisplay(400, file=out, mininterval=0)
    bar.update(stats)
    shown = out.getvalue().rsplit("\r", 1)[-1]
    assert " 99%|" in shown and "100%" not in shown
    assert "1 in flight (oldest 26s)" in shown or "1 in flight (oldest 0:26)" in shown, shown
    w = WidgetDisplay(400, show=False, figure=False)
    w.update(stats)
    assert w.bar.description == "99%"
    assert "(oldest" in w.header.value


def test_after_stop_nothing_is_in_flight_and_cancelled_rows_are_counted() -> None:
    from dfbatch.display.widget import WidgetDisplay
    from dfbatch.events import RunFinished

    acc = StatsAccumulator()
    for ev in _events_with_a_straggler():
        acc.apply(ev)
    acc.apply(RunFinished(30.0, cancelled=True))
    stats = acc.snapshot()
    assert stats.in_flight == 0 and all(a.in_flight == 0 for a in stats.agents)
    assert stats.rows_cancelled == 4
    w = WidgetDisplay(400, show=False, figure=False)
    w.close(stats)
    assert ">0</b> <span style=\"opacity:.7\">in flight" in w.header.value
    assert "4</b> <span style=\"opacity:.7\">cancelled rows" in w.header.value


def test_a_resumed_run_says_so_and_counts_from_the_rows_already_done(
    tmp_path: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from dfbatch.display.console import ConsoleDisplay

    df = pl.DataFrame({"id": range(40), "text": [f"row {i}" for i in range(40)]})
    first = df.head(30)
    dfbatch.process(first, _lengths, checkpoint=tmp_path, progress=False, agents=1)
    # the same frame again, larger: a journal of another frame is refused, so resume the same
    acc = StatsAccumulator()
    dfbatch.process(first, _lengths, checkpoint=tmp_path, progress="bar", agents=1,
                    on_event=acc.apply)
    err = capsys.readouterr().err
    assert "resuming: 30 of 30 rows already done" in err
    stats = acc.snapshot()
    assert (stats.rows_before, stats.rows_shown, stats.total_shown) == (30, 30, 30)
    out = io.StringIO()
    bar = ConsoleDisplay(0, file=out, mininterval=0)
    bar.close(stats)
    assert "30/30 rows" in out.getvalue()


# -- item 9: figures a reviewer would sign (asserted on the matplotlib artists) ---------------
def _ran(n_agents: int = 2, errors: bool = False) -> pl.DataFrame:
    from tests.test_display_plots import synthetic_result

    result = synthetic_result(n_agents=n_agents)
    return result if errors else result.with_columns(error=pl.lit(None, pl.String))


def test_busy_time_is_wall_clock_never_longer_than_the_run() -> None:
    from dfbatch.display.plots import agent_table, batch_table

    result = _ran(3)
    table = batch_table(result)
    run_s = float((table["start_s"] + table["elapsed_s"]).max())  # type: ignore[arg-type]
    busy = agent_table(result)["busy_s"]
    summed = table.group_by("agent").agg(pl.col("elapsed_s").sum()).sort("agent")["elapsed_s"]
    assert (busy <= run_s + 1e-9).all()
    assert (busy <= summed + 1e-9).all() and (busy < summed - 1e-9).any()  # overlaps once


def test_an_error_panel_without_errors_has_a_0_to_1_integer_axis() -> None:
    from dfbatch.display.plots import plot_agent_load

    fig = plot_agent_load(_ran(3))
    errors = fig.axes[3]
    assert errors.get_ylim() == (0.0, 1.0)
    fig.canvas.draw()
    ticks = [t.get_text() for t in errors.get_yticklabels() if t.get_text()]
    assert ticks == ["0", "1"]


def test_tick_labels_share_one_unit_per_axis() -> None:
    from dfbatch.display.plots import plot_agent_load

    result = _ran(4).with_columns(pl.col("n_tokens") * 40)  # tens of thousands of tokens
    fig = plot_agent_load(result)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    non_zero = [x for x in labels if x != "0"]
    assert non_zero and (all(x.endswith("k") for x in non_zero)
                         or not any(x.endswith("k") for x in non_zero)), labels


def test_the_token_measure_is_named_in_both_figures() -> None:
    from dfbatch.display.live_figure import LiveFigure
    from dfbatch.display.plots import plot_agent_load
    from dfbatch.events import RunStats

    assert plot_agent_load(_ran()).axes[0].get_title(loc="left") == "text tokens (n_tokens)"
    live = LiveFigure()
    live.render(RunStats(total_rows=4, rows_done=1, elapsed_s=1.0))
    assert live.axes["load"].get_title(loc="left") == "Agent load (request tokens)"


def test_the_incident_lanes_name_what_the_header_counts() -> None:
    from dfbatch.display.live_figure import LiveFigure
    from dfbatch.events import RunStats

    live = LiveFigure()
    stats = RunStats(total_rows=4, rows_done=1, elapsed_s=2.0, retries=2, rate_limited=2,
                     incidents=((0.5, "429"), (1.0, "429")))
    live.render(stats)
    inc = live.axes["inc"]
    assert [t.get_text() for t in inc.get_yticklabels()] == ["other retry", "429 retry", "error"]
    assert len(live.points["429"].get_offsets()) == 2  # the header's 2 retries are drawn


def test_the_agent_load_legend_sits_outside_the_panels() -> None:
    from dfbatch.display.plots import plot_agent_load

    fig = plot_agent_load(_ran(6))
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_title(loc="left")


def test_the_live_figure_comes_as_three_panels_that_wrap_when_narrow() -> None:
    import io

    from PIL import Image

    from dfbatch.display.live_figure import LiveFigure
    from dfbatch.display.widget import WidgetDisplay, _png_width
    from tests.test_display_widget import snapshots

    live = LiveFigure()
    stats = snapshots(3, n_agents=3, n_batches=30)[-1]
    whole = Image.open(io.BytesIO(live.render(stats)))
    panels = [Image.open(io.BytesIO(p)) for p in live.render_panels(stats)]
    assert len(panels) == 3
    assert sum(p.width for p in panels) == whole.width
    assert all(p.height == whole.height for p in panels)
    assert all(p.width > whole.width / 5 for p in panels)  # each panel readable on its own
    # the widget lays them out in a wrapping row, each growing from its natural width
    w = WidgetDisplay(90, show=False, figure=False)
    w._publish((live.render_panels(stats), 0.01))
    assert w.image.layout.flex_flow == "row wrap" and w.image.layout.display == "flex"
    assert [i.layout.flex for i in w.images] == [f"1 1 {p.width}px" for p in panels]
    assert _png_width(w.images[0].value) == panels[0].width


# -- item 10: the ETA knows the rate limits --------------------------------------------------
def test_eta_is_never_shorter_than_the_rate_limits_allow() -> None:
    import io

    from dfbatch.display.console import ConsoleDisplay
    from dfbatch.events import BatchFinished, BatchStarted, RunStarted

    acc = StatsAccumulator()
    acc.apply(RunStarted(0.0, 100, 25, 100_000, (100_000,), tpm=60_000))
    for b in range(3):  # a burst from the full bucket: 12 rows, 12k tokens in the first second
        acc.apply(BatchStarted(0.0, b, 0, 0, 4, 4_000, 1))
        acc.apply(BatchFinished(1.0, b, 0, 0, 4, 4_000, 1.0, 4, 0))
    stats = acc.snapshot(now=1.0)
    assert stats.rows_per_s == pytest.approx(12.0)  # (100 - 12) / 12 = 7 s at that rate
    assert stats.eta_s == pytest.approx(60.0 * 88_000 / 60_000)  # 88 s at 60k TPM
    out = io.StringIO()
    bar = ConsoleDisplay(100, file=out, mininterval=0)
    bar.update(stats)
    assert "<1:28" in out.getvalue().rsplit("\r", 1)[-1]
    rpm = StatsAccumulator()
    rpm.apply(RunStarted(0.0, 100, 25, 100, (100,), rpm=10))
    rpm.apply(BatchStarted(0.0, 0, 0, 0, 4, 4, 1))
    rpm.apply(BatchFinished(1.0, 0, 0, 0, 4, 4, 1.0, 4, 0))
    assert rpm.snapshot(now=1.0).eta_s == pytest.approx(60.0 * 24 / 10)
