"""Deliver widget clicks to a blocking notebook cell: pump the kernel's comm messages.

While a blocking ``process()`` runs its pool on a worker thread, the cell's (main) thread only
waits; ``KernelPump.poll`` lets it hand the kernel's pending widget messages (``comm_msg``: a
click on the dashboard's Stop button) to their handlers meanwhile, and holds every other shell
message (the next cell's ``execute_request`` …) to give back to the kernel, in order, when the
cell ends (``close``). Without it the kernel reads no message until the cell ends.

- ipykernel >= 7 (a shell channel thread hands the main thread its messages over an inproc
  socket): read that socket here; comm messages are dispatched at once, the rest are queued
  back onto the kernel's loop on ``close``.
- ipykernel 6 (``Kernel.do_one_iteration``): ``jupyter-ui-poll`` does the same job.

``open_pump()`` is None outside a kernel or with a kernel it does not know: then the Stop
button cannot work under the blocking form (interrupt the kernel instead).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("dfbatch")

_COMMS = frozenset({"comm_msg"})


class KernelPump:
    """Pumps the comm messages of ipykernel >= 7 from the thread that runs a cell."""

    def __init__(self, kernel: Any, stream: Any) -> None:
        self.kernel, self.stream = kernel, stream
        self.socket = stream.socket
        self.held: list[Any] = []

    def idle(self, timeout_s: float) -> None:
        """Sleep until a message comes or ``timeout_s`` passes (without the interpreter lock:
        the run's thread keeps it)."""
        self.socket.poll(int(timeout_s * 1000))

    def poll(self) -> int:
        """Handle the pending comm messages (hold the others); how many were handled."""
        handled = 0
        session = self.kernel.session
        while self.socket.poll(0):
            raw = self.socket.recv_multipart(copy=False)
            try:
                idents, frames = session.feed_identities(raw, copy=False)
                msg = session.deserialize(frames, content=False, copy=False)
                if msg["header"].get("msg_type") not in _COMMS:
                    self.held.append(raw)
                    continue
                msg = session.deserialize(frames, content=True, copy=False)
            except Exception:  # not ours to judge: the kernel reads it later
                self.held.append(raw)
                continue
            try:
                self.kernel.comm_manager.comm_msg(None, idents, msg)
            except Exception:
                log.exception("dfbatch: a widget message failed while the cell ran")
            handled += 1
        return handled

    def close(self) -> None:
        """Give the held messages back to the kernel: they run, in order, after this cell."""
        stream, held, self.held = self.stream, self.held, []
        callback = getattr(stream, "_recv_callback", None)
        if not held or callback is None:
            return
        loop = stream.io_loop
        for raw in held:
            loop.add_callback(stream._run_callback, callback, raw)


class UiPollPump:
    """``jupyter-ui-poll`` for ipykernel 6 (``Kernel.do_one_iteration``)."""

    def __init__(self) -> None:
        from jupyter_ui_poll import ui_events

        self._cm = ui_events()
        self._poll = self._cm.__enter__()

    def idle(self, timeout_s: float) -> None:
        time.sleep(timeout_s)

    def poll(self) -> int:
        self._poll(10)
        return 0

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


Pump = KernelPump | UiPollPump


def open_pump() -> Pump | None:
    """A pump for the kernel this cell runs in; None outside a kernel, for an unknown one, or
    off the kernel's main thread (its sockets belong to that thread)."""
    if "ipykernel" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return None
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        kernel = getattr(get_ipython(), "kernel", None)
        if kernel is None or getattr(kernel, "comm_manager", None) is None:
            return None
        channel = getattr(kernel, "shell_channel_thread", None)
        pair = getattr(getattr(channel, "manager", None), "_shell_channel_to_main", None)
        stream = getattr(pair, "to_stream", None)
        if stream is not None:
            return KernelPump(kernel, stream)
        if hasattr(kernel, "do_one_iteration"):
            return UiPollPump()
    return None
