"""The notebook dashboard, built outside a kernel (ipywidgets without a frontend, Agg)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dfbatch.display.frames import FrameWorker
from dfbatch.display.live_figure import LiveFigure, rates
from dfbatch.display.widget import WidgetDisplay, _Budget
from dfbatch.events import RunStats, StatsAccumulator, fold
from tests.test_display_helpers import synthetic_events

PNG = b"\x89PNG\r\n\x1a\n"


def chip(html: str, label: str) -> str:
    m = re.search(rf"<b>([^<]*)</b> <span[^>]*>{re.escape(label)}</span>", html)
    assert m, f"no {label!r} in header"
    return m.group(1)


def snapshots(n: int = 12, **kwargs: object) -> list[RunStats]:
    events = synthetic_events(**kwargs)  # type: ignore[arg-type]
    acc, out = StatsAccumulator(), []
    for k in range(1, n + 1):
        for ev in events[(k - 1) * len(events) // n: k * len(events) // n]:
            acc.apply(ev)
        out.append(acc.snapshot())
    return out


def test_update_sets_bar_and_key_figures() -> None:
    w = WidgetDisplay(100, show=False, figure=False)
    w.update(RunStats(total_rows=100, rows_done=40, tokens_done=8000, elapsed_s=4.0,
                      in_flight=3, retries=2, rate_limited=1, errors=1))
    assert (w.bar.value, w.bar.max, w.bar.description) == (40, 100, "40%")
    html = w.header.value
    assert chip(html, "rows") == "40 / 100"
    assert chip(html, "rows/s") == "10"
    assert chip(html, "tok/s") == "2,000"
    assert chip(html, "ETA") == "0:06"
    assert [chip(html, k) for k in ("in flight", "retries", "429s", "errors")] == list("3211")
    assert ">running<" in html


def test_header_refreshes_are_throttled_to_save_comm_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [10.0]
    monkeypatch.setattr("dfbatch.display.widget._now", lambda: clock[0])
    w = WidgetDisplay(100, show=False, figure=False, header_interval_s=0.5, stop=lambda: None)
    sent: list[str] = []
    w.header.observe(lambda change: sent.append(change["new"]), "value")
    w.bar.observe(lambda change: sent.append(change["name"]), ["value", "description"])
    for i in range(10):  # 4 updates per second for 2.5 s
        clock[0] = 10.0 + i * 0.25
        w.update(RunStats(total_rows=100, rows_done=10 * i, elapsed_s=i * 0.25))
    headers = [v for v in sent if v.startswith("<")]
    assert len(headers) == 5  # every other update
    assert w.bar.value == 80  # the last refresh, at 2.0 s
    w._on_stop(None)  # a click shows "stopping" at the next update, due or not
    w.update(RunStats(total_rows=100, rows_done=95, elapsed_s=2.3))
    assert ">stopping<" in w.header.value and w.bar.value == 95
    w.close(RunStats(total_rows=100, rows_done=100, rows_ok=100, finished=True))
    assert w.bar.value == 100  # the final state is always shown


@pytest.mark.parametrize(
    ("final", "state", "style"),
    [
        (RunStats(total_rows=4, rows_done=4, rows_ok=4, finished=True), "done", "success"),
        (RunStats(total_rows=4, rows_done=4, rows_ok=3, rows_failed=1, finished=True),
         "done", "warning"),
        (RunStats(total_rows=4, rows_done=2, finished=True, cancelled=True), "stopped", "danger"),
        (RunStats(total_rows=4, rows_done=1), "failed", "danger"),
    ],
)
def test_close_shows_the_final_state(final: RunStats, state: str, style: str) -> None:
    w = WidgetDisplay(4, show=False, figure=False, stop=lambda: None)
    w.close(final)
    assert w.bar.bar_style == style
    assert f">{state}<" in w.header.value
    assert w.bar.value == final.rows_done
    assert w.button.disabled


def test_stop_button_calls_stop_once_and_shows_stopping() -> None:
    calls: list[int] = []
    w = WidgetDisplay(10, show=False, figure=False, stop=lambda: calls.append(1))
    assert not w.button.disabled
    w.button.click()
    w.button.click()
    assert calls == [1]
    assert w.button.disabled and w.button.description == "Stopping"
    w.update(RunStats(total_rows=10, rows_done=3, elapsed_s=1.0))
    assert ">stopping<" in w.header.value


def test_stop_button_is_disabled_without_a_stop_callback() -> None:
    w = WidgetDisplay(10, show=False, figure=False)
    assert w.button.disabled
    assert "interrupt the kernel" in w.button.tooltip
    w.button.click()  # no error, nothing to call


def test_a_failing_stop_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        msg = "no"
        raise RuntimeError(msg)

    w = WidgetDisplay(10, show=False, figure=False, stop=boom)
    w.button.click()
    assert "stop callback failed" in caplog.text


def test_figure_is_a_png_and_redraws_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("dfbatch.display.widget._now", lambda: clock[0])
    w = WidgetDisplay(240, show=False, min_figure_interval_s=0.5, figure_budget=1.0)
    assert w.renderer is not None
    frames = snapshots(12)
    for i, stats in enumerate(frames):
        clock[0] = i * 0.2  # 5 updates per second
        w.update(stats)
        assert w.renderer.wait(30)  # let the worker finish, as if drawing were instant
    assert [i.value[:8] for i in w.images] == [PNG] * 3  # one image per panel
    assert w.figure_draws == 4  # submitted at t = 0, 0.6, 1.2, 1.8 (one per 0.5 s), shown
    w.close(frames[-1])  # at the next update; the final frame is always drawn
    assert w.figure_draws == 5
    assert w.renderer is None


def test_budget_spaces_out_slow_figures() -> None:
    b = _Budget(share=0.05, min_interval_s=0.0, burst_s=0.1)
    assert b.ready(now=0.0)
    b.spend(cost=0.3)  # 0.2 s over budget: 4 s at 5% to repay
    assert not b.ready(now=3.9)
    assert b.ready(now=4.1)


def test_live_figure_redraws_only_data_until_limits_grow() -> None:
    live = LiveFigure()
    frames = snapshots(12, n_agents=4, n_batches=120)
    for stats in frames:
        png = live.render(stats)
        assert png[:8] == PNG
    assert 1 <= live.full_draws <= 6  # grows geometrically, not once per frame
    before = live.full_draws
    live.render(frames[-1], final=True)
    assert live.full_draws == before + 1
    assert live.limits is not None and live.limits.agents == 4
    assert live.limits.t_end == pytest.approx(max(1.0, frames[-1].elapsed_s))


def test_live_figure_bars_show_done_stolen_and_in_flight_tokens() -> None:
    live = LiveFigure()
    stats = snapshots(3, n_agents=3, n_batches=30, p_steal=0.5)[1]
    live.render(stats)
    tops = [p.vertices[:, 1].max() for p in live.bars["inflight"].get_paths()]
    done = [a.done_tokens + a.inflight_tokens for a in stats.agents]
    assert tops == pytest.approx(done)
    stolen = [p.vertices[:, 1].max() - p.vertices[:, 1].min()
              for p in live.bars["stolen"].get_paths()]
    assert stolen == pytest.approx([a.stolen_tokens for a in stats.agents])
    assert len(live.bars["done"].get_paths()) == 3


def test_live_figure_handles_an_empty_run() -> None:
    live = LiveFigure()
    assert live.render(RunStats())[:8] == PNG
    assert live.render(fold([]), final=True)[:8] == PNG


def test_rates_over_a_sliding_window() -> None:
    history = tuple((t * 0.5, int(t * 0.5 * 10), int(t * 0.5 * 100)) for t in range(41))
    t, rows, toks = rates(history)
    assert len(t) == 40 and t[0] == 0.5
    assert np.allclose(rows, 10.0) and np.allclose(toks, 100.0)
    assert [len(x) for x in rates(((0.0, 0, 0),))] == [0, 0, 0]


def test_a_broken_figure_is_logged_once_and_the_header_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        msg = "agg exploded"
        raise RuntimeError(msg)

    monkeypatch.setattr(LiveFigure, "render_panels", broken)
    w = WidgetDisplay(240, show=False, min_figure_interval_s=0.0, draw="thread")
    for stats in snapshots(4):
        w.update(stats)
        assert w.renderer is not None and w.renderer.wait(30)
    w.close(snapshots(4)[-1])
    assert caplog.text.count("live figure failed") == 1
    assert w.figure_draws == 0 and all(i.value == b"" for i in w.images)
    assert w.bar.value == snapshots(4)[-1].rows_done
    assert w.bar.bar_style in ("success", "warning")


def test_the_worker_never_blocks_the_caller_and_ends_on_finish() -> None:
    import threading

    gate = threading.Event()
    worker = FrameWorker("thread")
    orig = LiveFigure.render

    def slow(self: LiveFigure, stats: RunStats, *, final: bool = False) -> bytes:
        gate.wait(10)
        return orig(self, stats, final=final)

    LiveFigure.render = slow  # type: ignore[method-assign]
    try:
        stats = snapshots(2)[-1]
        assert worker.submit(stats)
        assert not worker.idle() and not worker.submit(stats)  # busy: refused, not queued
        assert worker.take() is None
        gate.set()
        assert worker.wait(30)
        frame = worker.take()
        assert frame is not None and frame[0][:8] == PNG and frame[1] > 0
        final = worker.finish(stats)
        assert final is not None and final[0][:8] == PNG
        assert not worker._thread.is_alive()
        assert not worker.submit(stats)
    finally:
        LiveFigure.render = orig  # type: ignore[method-assign]


def test_a_run_shorter_than_a_second_draws_no_figure() -> None:
    w = WidgetDisplay(8, show=False)
    worker = w.renderer
    assert worker is not None
    w.update(RunStats(total_rows=8, rows_done=4, elapsed_s=0.4))
    w.close(RunStats(total_rows=8, rows_done=8, rows_ok=8, elapsed_s=0.8, finished=True))
    assert not worker.started  # no thread, no matplotlib, no frame
    assert w.figure_draws == 0 and w.image.layout.display == "none"
    assert w.bar.bar_style == "success"
