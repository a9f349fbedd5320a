"""Figure frames drawn by a child process: replies, errors, fallback, and no leftover process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dfbatch.display import drawers, frames
from dfbatch.display.frames import FrameProcess, FrameWorker, ThreadDrawer
from dfbatch.events import RunStats
from tests.test_display_widget import PNG, snapshots


@pytest.fixture(autouse=True)
def no_idle_child() -> None:
    frames._shutdown()  # each test starts without a kept frame process



def test_the_child_process_draws_frames_and_exits_with_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(frames, "KEEP_ALIVE_S", 0.0)
    worker = FrameWorker()
    runs = snapshots(6, n_agents=3, n_batches=60)
    for stats in runs[:-1]:
        assert worker.submit(stats)
        assert worker.wait(60)
        png, cpu_s = worker.take() or (b"", 0.0)
        assert png[:8] == PNG and cpu_s > 0
    drawer = worker.drawer
    assert isinstance(drawer, FrameProcess)
    assert drawer.proc.pid != os.getpid()
    final = worker.finish(runs[-1])
    assert final is not None and final[0][:8] == PNG
    assert drawer.proc.poll() == 0  # its stdin closed: it ended on its own
    assert not worker._thread.is_alive()


def test_the_next_run_reuses_the_child_which_ends_when_idle_too_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = snapshots(4, n_agents=2, n_batches=40)
    children, first_frame_cpu = [], []
    for _ in range(2):
        worker = FrameWorker()
        assert worker.submit(runs[1]) and worker.wait(60)
        first_frame_cpu.append((worker.take() or (b"", 0.0))[1])
        assert worker.finish(runs[-1]) is not None
        assert isinstance(worker.drawer, FrameProcess)
        children.append(worker.drawer)
    assert children[0] is children[1] and children[1].alive()
    assert children[1].run == 1  # the same process, on its second run
    assert first_frame_cpu[1] < first_frame_cpu[0]  # matplotlib was imported already
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    assert len(timers) == 1  # one keep-alive timer, not one per run

    monkeypatch.setattr(frames, "KEEP_ALIVE_S", 0.2)
    worker = FrameWorker()
    assert worker.submit(runs[1]) and worker.wait(60)
    worker.finish(runs[-1])
    assert worker.drawer is children[0]
    deadline = time.monotonic() + 30
    while children[0].alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not children[0].alive() and frames._idle is None


def test_frames_from_the_child_equal_frames_drawn_here() -> None:
    stats = snapshots(4, n_agents=2, n_batches=20)[-1]
    child = FrameProcess()
    try:
        png, _ = child.draw(stats, True)
    finally:
        child.close()
    here, _ = ThreadDrawer().draw(stats, True)
    assert png == here


def test_a_drawing_error_in_the_child_is_logged_once_and_the_worker_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = FrameWorker()
    bad = RunStats(total_rows=4, rows_done=1, elapsed_s=1.0, history=(("not", "numbers", 0),) * 2)
    with caplog.at_level(logging.ERROR, logger="dfbatch.display"):
        assert worker.submit(bad)  # type: ignore[arg-type]
        assert worker.wait(60)
    assert worker.take() is None
    assert caplog.text.count("live figure failed") == 1
    assert "drawing in the frame process failed" in caplog.text
    assert not worker.submit(snapshots(2)[-1])  # ended: the header goes on alone
    worker.close()


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
def test_without_a_child_process_frames_are_drawn_in_the_thread(
    executable: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(drawers.sys, "executable", executable)
    worker = FrameWorker()
    with caplog.at_level(logging.INFO, logger="dfbatch.display"):
        assert worker.submit(snapshots(3)[-1])
        assert worker.wait(60)
    png, _ = worker.take() or (b"", 0.0)
    assert png[:8] == PNG
    assert isinstance(worker.drawer, ThreadDrawer)
    assert "drawing the figure in a thread" in caplog.text
    worker.close()


def test_a_child_that_dies_mid_run_is_replaced_by_a_thread_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = FrameWorker()
    runs = snapshots(3)
    assert worker.submit(runs[0]) and worker.wait(60)
    assert worker.take() is not None
    assert isinstance(worker.drawer, FrameProcess)
    worker.drawer.kill()
    with caplog.at_level(logging.INFO, logger="dfbatch.display"):
        assert worker.submit(runs[1]) and worker.wait(60)
    assert worker.take() is not None  # drawn in the thread now
    assert isinstance(worker.drawer, ThreadDrawer)
    assert "the frame process stopped" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert worker.finish(runs[2]) is not None


def test_an_interrupt_does_not_reach_the_child(caplog: pytest.LogCaptureFixture) -> None:
    import signal

    worker = FrameWorker()
    runs = snapshots(3)
    assert worker.submit(runs[0]) and worker.wait(60)
    child = worker.drawer
    assert isinstance(child, FrameProcess)
    assert os.getpgid(child.proc.pid) != os.getpgid(0)  # a kernel Interrupt signals the group
    os.kill(child.proc.pid, signal.SIGINT)  # and a SIGINT sent to it anyway is ignored
    with caplog.at_level(logging.INFO, logger="dfbatch.display"):
        assert worker.submit(runs[1]) and worker.wait(60)
        assert worker.take() is not None
    assert worker.drawer is child and child.alive()
    assert "frame process" not in caplog.text
    assert worker.finish(runs[2]) is not None


def test_close_kills_a_child_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drawers, "_BOOT", "import time; time.sleep(120)")
    worker = FrameWorker(timeout_s=1.0)
    assert worker.submit(snapshots(2)[-1])
    deadline = time.monotonic() + 30
    while worker.drawer is None and time.monotonic() < deadline:
        time.sleep(0.01)
    drawer = worker.drawer
    assert isinstance(drawer, FrameProcess)
    t = time.monotonic()
    worker.close()
    assert time.monotonic() - t < 10
    assert drawer.proc.poll() is not None and not worker._thread.is_alive()


def test_the_child_imports_matplotlib_but_not_polars_or_the_pool() -> None:
    package = str(Path(frames.__file__).resolve().parents[1])
    probe = (
        drawers._BARE_PACKAGE + "import dfbatch.display.frames, dfbatch.display.live_figure as lf; "
        "lf.LiveFigure(); "
        "print(sorted(m for m in ('polars', 'matplotlib', 'dfbatch.execute._pool', "
        "'dfbatch.events') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe, package], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "['dfbatch.events', 'matplotlib']"


def test_draw_must_be_process_or_thread() -> None:
    with pytest.raises(ValueError, match="draw must be 'process' or 'thread', got 'gpu'"):
        FrameWorker("gpu")  # type: ignore[arg-type]
