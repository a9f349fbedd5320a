"""How a figure frame gets drawn: here (``ThreadDrawer``), or in a child process
(``FrameProcess``, which runs ``child_main``) that imports only matplotlib and the drawing code.

The parent pickles ``(run, RunStats, final, panels)`` requests over the child's stdin and reads
``("ok", png, cpu_s)`` or ``("error", traceback)`` replies from its stdout, each message
length-prefixed. ``dfbatch.display.frames`` keeps one child between runs and hands it to the
``FrameWorker`` thread.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Protocol

from dfbatch.errors import FrameError
from dfbatch.events import RunStats

_HEADER = struct.Struct(">Q")
# The child imports only what drawing needs: a bare ``dfbatch`` package module (its path, not
# its __init__, which would import polars and the pool) is registered before the imports.
_BARE_PACKAGE = (
    "import sys, types; dfbatch = types.ModuleType('dfbatch'); dfbatch.__path__ = [sys.argv[1]]; "
    "sys.modules['dfbatch'] = dfbatch; "
)
_BOOT = _BARE_PACKAGE + "from dfbatch.display.drawers import child_main; child_main()"


Png = bytes | tuple[bytes, ...]  # the figure, or one PNG per panel (``panels=True``)


class Drawer(Protocol):
    def draw(self, stats: RunStats, final: bool, panels: bool = False) -> tuple[Png, float]:
        """PNG bytes (a tuple of them, one per panel, with ``panels``) and the CPU seconds."""
        ...

    def close(self) -> None: ...


class ThreadDrawer:
    """Draws in the calling thread (holds the GIL while drawing)."""

    def __init__(self) -> None:
        self.live: Any = None

    def draw(self, stats: RunStats, final: bool, panels: bool = False) -> tuple[Png, float]:
        start = time.thread_time()
        if self.live is None:
            from dfbatch.display.live_figure import LiveFigure

            self.live = LiveFigure()
        png: Png = (self.live.render_panels(stats, final=final) if panels
                    else self.live.render(stats, final=final))
        return png, time.thread_time() - start

    def close(self) -> None:
        self.live = None


class FrameProcess:
    """A child process that draws frames: one request, one reply, over its stdin / stdout.

    Each request carries the run number (``run``), the snapshot and whether it is the final
    frame; a new run number starts a new figure in the child.

    ``draw`` raises ``FrameError`` when the child is gone, and re-raises a drawing error of the
    child as ``RuntimeError`` with its traceback. The child ends when its stdin closes (also when
    this process dies), so it never outlives this process.
    """

    def __init__(self) -> None:
        env = dict(os.environ, MPLBACKEND="Agg")
        package = str(Path(__file__).resolve().parents[1])  # .../dfbatch
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, package], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True,  # a kernel Interrupt (SIGINT to the group) skips it
            )
        except (OSError, ValueError) as exc:
            msg = f"could not start the frame process ({sys.executable!r}): {exc}"
            raise FrameError(msg) from exc
        self.run = 0  # the child starts a new figure when this changes

    def alive(self) -> bool:
        return self.proc.poll() is None

    def draw(self, stats: RunStats, final: bool, panels: bool = False) -> tuple[Png, float]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        msg = "the frame process stopped (exit code {})"
        request = (self.run, stats, final, panels)
        try:
            _send(stdin, pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL))
            reply = _receive(stdout)
        except (OSError, ValueError) as exc:  # a broken or closed pipe
            raise FrameError(msg.format(self.proc.poll())) from exc
        if reply is None:
            raise FrameError(msg.format(self.proc.poll()))
        kind, *rest = pickle.loads(reply)
        if kind == "error":
            msg = f"drawing in the frame process failed:\n{rest[0]}"
            raise RuntimeError(msg)
        png, cpu_s = rest
        return png, cpu_s

    def close(self, timeout_s: float = 5.0) -> None:
        """Close its stdin (it exits); kill it if it does not within ``timeout_s``."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def child_main() -> None:
    """The frame process: read ``(run, stats, final)`` requests, reply ``("ok", png, cpu_s)``."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C / Interrupt is the run's business
    if hasattr(os, "nice"):
        os.nice(10)  # the run first
    drawer, run = ThreadDrawer(), None
    while (request := _receive(stdin)) is not None:
        start = time.process_time()  # the first frame includes importing matplotlib
        try:
            number, stats, final, panels = pickle.loads(request)
            if number != run:
                drawer, run = ThreadDrawer(), number
            png, _ = drawer.draw(stats, final, panels)
            reply: tuple[Any, ...] = ("ok", png, time.process_time() - start)
        except Exception:
            import traceback

            reply = ("error", traceback.format_exc())
        _send(stdout, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes | None:
    """One message, or None at the end of the stream."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None
