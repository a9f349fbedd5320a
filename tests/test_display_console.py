"""The terminal bar, the choice of view, the never-raise guard and lazy imports."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

import dfbatch.display as display
from dfbatch.display.console import ConsoleDisplay
from dfbatch.errors import ConfigError
from dfbatch.events import RunStats


def running(**kw: object) -> RunStats:
    base: dict[str, object] = dict(total_rows=200, rows_done=50, tokens_done=25_000,
                                   elapsed_s=5.0, in_flight=6, retries=3, rate_limited=2, errors=1)
    base.update(kw)
    return RunStats(**base)  # type: ignore[arg-type]


def test_bar_shows_rows_and_key_figures_in_the_postfix() -> None:
    out = io.StringIO()
    bar = ConsoleDisplay(200, file=out, mininterval=0)
    bar.update(running())
    text = out.getvalue()
    assert "50/200 rows" in text
    assert "25%" in text
    for part in ("10 rows/s", "5,000 tok/s", "6 in flight", "3 retries", "2×429", "1 errors"):
        assert part in text
    bar.close(running(rows_done=200, finished=True, in_flight=0))
    assert "200/200 rows" in out.getvalue()
    assert bar.bar.n == 200


@pytest.mark.parametrize(
    ("stats", "prefix"),
    [(running(cancelled=True, finished=True), "stopped"), (running(), "failed")],
)
def test_bar_close_names_a_stopped_or_failed_run(stats: RunStats, prefix: str) -> None:
    out = io.StringIO()
    bar = ConsoleDisplay(200, file=out)
    bar.close(stats)
    bar.close(stats)  # idempotent
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith(prefix)
    assert out.getvalue().count(prefix) == 1


def test_progress_false_opens_nothing() -> None:
    assert display.open_display(False, total_rows=3) is None


def test_auto_in_a_script_without_a_terminal_opens_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(display, "_stderr_is_tty", lambda: False)
    assert display.open_display("auto", total_rows=3) is None
    assert display.open_display(True, total_rows=3) is None


def test_auto_on_a_terminal_and_bar_open_the_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(display, "_stderr_is_tty", lambda: True)
    for choice in ("auto", "bar"):
        d = display.open_display(choice, total_rows=3)
        assert isinstance(d, display._Guarded)
        assert isinstance(d.inner, ConsoleDisplay)
        d.close(RunStats(total_rows=3, rows_done=3, finished=True))


def test_auto_inside_a_kernel_opens_the_widget(monkeypatch: pytest.MonkeyPatch) -> None:
    from dfbatch.display import widget

    monkeypatch.setattr(display, "in_jupyter_kernel", lambda: True)
    shown: list[object] = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    d = display.open_display("auto", total_rows=3, stop=lambda: None)
    assert isinstance(d, display._Guarded)
    assert isinstance(d.inner, widget.WidgetDisplay)
    assert shown == [d.inner.box]
    assert not d.inner.button.disabled


def test_widget_outside_a_kernel_falls_back_to_the_bar() -> None:
    d = display.open_display("widget", total_rows=3)
    assert isinstance(d, display._Guarded)
    assert isinstance(d.inner, ConsoleDisplay)
    d.close(RunStats(total_rows=3, rows_done=3, finished=True))


def test_a_bad_progress_value_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="progress must be 'auto', 'widget', 'bar', True or"):
        display.open_display("yes", total_rows=3)


def test_the_guard_logs_once_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        calls = 0

        def update(self, stats: RunStats) -> None:
            self.calls += 1
            msg = "render bug"
            raise ValueError(msg)

        def close(self, stats: RunStats) -> None:
            msg = "close bug"
            raise ValueError(msg)

    inner = Broken()
    guarded = display._Guarded(inner)
    with caplog.at_level(logging.ERROR, logger="dfbatch.display"):
        for _ in range(3):
            guarded.update(RunStats())
        guarded.close(RunStats())
    assert inner.calls == 1  # quiet after the first failure
    assert caplog.text.count("progress view failed") == 1
    assert "render bug" in caplog.text


def test_not_in_a_kernel_here() -> None:
    assert display.in_jupyter_kernel() is False


@pytest.mark.slow
def test_import_dfbatch_imports_no_display_library() -> None:
    code = (
        "import sys, dfbatch, dfbatch.display;"
        "print(sorted(m for m in ('ipywidgets', 'matplotlib', 'tqdm', 'IPython')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
