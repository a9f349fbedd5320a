"""Figure frames for the dashboard, drawn off the event loop: in a child process by default.

A no-op run keeps its event loop busy with Python code, so anything else that runs Python in the
same process takes the interpreter lock (GIL) from it: a matplotlib frame drawn in a thread slowed
such a run far more than its own CPU time (importing matplotlib and laying out the figure is a
second of work; while a thread holds the lock, the loop waits for it at every ``select``). So the
frames are drawn by a small child process (``python -c ...`` running ``child_main``, see
``dfbatch.display.drawers``) that imports matplotlib and keeps the ``LiveFigure``; the parent
only pickles the ``RunStats`` snapshot over a pipe and reads PNG bytes back, in a worker thread
that waits with the lock released.

The child outlives the run by ``KEEP_ALIVE_S`` seconds (default 300) and the next run in
the session uses it again: only the first run pays for starting it (an interpreter and a
matplotlib import, about a second of CPU on another core); later ones get their first frame
at once. It runs at a lower priority (``nice`` 10) so that on a busy machine the run comes
first, and it ends when its stdin closes, so it never outlives this process.

``FrameWorker`` is what the widget talks to; it never blocks the caller. ``draw="process"`` (the
default) falls back to drawing in the worker thread when no child process can be started (an
embedded interpreter, a sandbox): the figure still shows, at the old cost.

Examples
--------
>>> from dfbatch.events import RunStats
>>> from dfbatch.display.frames import FrameWorker
>>> worker = FrameWorker(draw="thread")
>>> worker.submit(RunStats(total_rows=4, rows_done=1, elapsed_s=1.0))
True
>>> png, cpu_s = worker.finish(RunStats(total_rows=4, rows_done=4, elapsed_s=2.0))
>>> png[:8], worker.started
(b'\\x89PNG\\r\\n\\x1a\\n', True)
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Literal

from dfbatch.display.drawers import Drawer, FrameProcess, Png, ThreadDrawer, child_main
from dfbatch.errors import FrameError
from dfbatch.events import RunStats

__all__ = [
    "KEEP_ALIVE_S",
    "FrameProcess",
    "FrameWorker",
    "Png",
    "ThreadDrawer",
    "acquire",
    "child_main",
    "release",
]

log = logging.getLogger("dfbatch.display")
Draw = Literal["process", "thread"]
KEEP_ALIVE_S = 300.0  # an idle frame process waits this long for the next run, then ends


_lock = threading.Lock()
_idle: FrameProcess | None = None  # the process kept for the next run
_timer: threading.Timer | None = None  # ends it after KEEP_ALIVE_S


def acquire() -> FrameProcess:
    """The idle frame process, set up for a new run, or a new one (may raise ``FrameError``)."""
    with _lock:
        child = _take_idle()
    if child is not None and child.alive():
        child.run += 1
        return child
    if child is not None:
        child.close()
    return FrameProcess()


def release(child: FrameProcess) -> None:
    """Keep ``child`` for the next run (``KEEP_ALIVE_S``), or end it."""
    global _idle, _timer
    if KEEP_ALIVE_S <= 0 or not child.alive():
        child.close()
        return
    with _lock:
        old = _take_idle()
        _idle = child
        _timer = threading.Timer(KEEP_ALIVE_S, _expire, args=(child,))
        _timer.daemon = True
        _timer.start()
    if old is not None:
        old.close()


def _take_idle() -> FrameProcess | None:
    """Take the idle process and stop its timer (call with ``_lock`` held)."""
    global _idle, _timer
    child, _idle = _idle, None
    if _timer is not None:
        _timer.cancel()
        _timer = None
    return child


def _expire(child: FrameProcess) -> None:
    with _lock:
        if _idle is not child:  # taken by a run in the meantime
            return
        _take_idle()
    child.close()


@atexit.register
def _shutdown() -> None:
    with _lock:
        child = _take_idle()
    if child is not None:
        child.close(timeout_s=1.0)


class FrameWorker:
    """One thread that gets figure frames drawn; the event loop hands it snapshots, never waits.

    ``submit`` and ``take`` never block; ``finish`` (at the end of the run) draws the final
    frame, waits for it and ends the thread; ``close`` ends it without a final frame. The
    thread (and the frame process) starts with the first frame. A drawing error is logged once
    and ends the worker (the header goes on).

    Parameters
    ----------
    draw
        ``"process"``: in a child process (falls back to ``"thread"`` if none can be started).
        ``"thread"``: in this worker thread, holding the GIL while drawing.
    timeout_s
        How long ``finish`` / ``close`` wait for a frame before giving up on it.
    """

    def __init__(self, draw: Draw = "process", timeout_s: float = 60.0,
                 panels: bool = False) -> None:
        if draw not in ("process", "thread"):
            msg = f"draw must be 'process' or 'thread', got {draw!r}"
            raise ValueError(msg)
        self.draw = draw
        self.timeout_s = timeout_s
        self.panels = panels  # one PNG per panel (the widget stacks them when narrow)
        self.drawer: Drawer | None = None
        self._cond = threading.Condition()
        self._job: tuple[RunStats, bool] | None = None
        self._busy = False
        self._done: tuple[Png, float] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dfbatch-figure", daemon=True)

    @property
    def started(self) -> bool:
        """Whether a frame was ever submitted (the thread starts with the first one)."""
        return self._thread.ident is not None

    def idle(self) -> bool:
        with self._cond:
            return not (self._busy or self._job is not None or self._closed)

    def submit(self, stats: RunStats, *, final: bool = False) -> bool:
        with self._cond:
            if self._closed or self._busy or self._job is not None:
                return False
            self._job = (stats, final)
            self._cond.notify_all()
        if not self.started:
            self._thread.start()
        return True

    def take(self) -> tuple[Png, float] | None:
        """The last finished frame and the CPU seconds it took, once."""
        with self._cond:
            done, self._done = self._done, None
            return done

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until no frame is queued or being drawn (tests, and ``finish``)."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._busy or self._job is not None),
                                       timeout_s if timeout_s is not None else self.timeout_s)

    def finish(self, stats: RunStats) -> tuple[Png, float] | None:
        """Draw the final frame, stop the thread, return the frame (None if drawing failed)."""
        self.wait()
        self.submit(stats, final=True)
        self.wait()
        with self._cond:
            done, self._done = self._done, None
        self.close()
        return done

    def close(self) -> None:
        """End the thread (it finishes the frame in hand first) and the process; idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.started:
            return
        self._thread.join(self.timeout_s)
        if self._thread.is_alive() and isinstance(self.drawer, FrameProcess):
            self.drawer.kill()  # a hung child: its pipe closes, the thread's read returns
            self._thread.join(self.timeout_s)

    def _run(self) -> None:
        try:
            while (job := self._next()) is not None:
                png = self._draw(*job)
                with self._cond:
                    self._busy = False
                    if png is None:
                        self._closed = True
                    else:
                        self._done = png
                    self._cond.notify_all()
                    if self._closed:
                        return
        finally:
            if isinstance(self.drawer, FrameProcess):
                release(self.drawer)
            elif self.drawer is not None:
                self.drawer.close()

    def _next(self) -> tuple[RunStats, bool] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._job is not None or self._closed)
            if self._job is None:
                return None
            job, self._job = self._job, None
            self._busy = True
            return job

    def _draw(self, stats: RunStats, final: bool) -> tuple[Png, float] | None:
        try:
            if self.drawer is None:
                self.drawer = self._open()
            if isinstance(self.drawer, FrameProcess):
                try:
                    return self.drawer.draw(stats, final, self.panels)
                except FrameError as exc:  # the child could not run or is gone: draw here
                    self.drawer.kill()
                    self.drawer.close()
                    if self._closed:  # killed by ``close``: no frame wanted any more
                        return None
                    log.info("dfbatch: %s; drawing the figure in a thread", exc)
                    self.drawer = ThreadDrawer()
            return self.drawer.draw(stats, final, self.panels)
        except Exception:
            log.exception("dfbatch: the live figure failed; showing the header only")
            return None

    def _open(self) -> Drawer:
        if self.draw == "process":
            try:
                return acquire()
            except FrameError as exc:
                log.info("dfbatch: %s; drawing the figure in a thread", exc)
        return ThreadDrawer()
