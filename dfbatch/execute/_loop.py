"""Run a coroutine from sync code: in a script (own loop) or inside Jupyter's running loop.

In a script the coroutine runs on a new loop in this thread. Inside a running loop (a notebook
cell, or the ``fn`` of another run: ``mark_run`` marks a run's context) it runs on a fresh loop
in a worker thread while the calling thread waits: the pool gets a plain loop of its own (no
re-entry of the kernel's loop, no nest-asyncio2: a kernel runs as fast as a script), and in a
kernel the waiting thread pumps the widget messages (``_pump``), so the dashboard's Stop button
works under the blocking form too. The worker runs in a copy of the caller's context (the
kernel's output routing, the run mark).

While the coroutine runs, the first Ctrl-C (or kernel interrupt) calls the graceful stop the
coroutine registered with ``on_interrupt`` (it returns the partial result; before one is
registered, Ctrl-C raises); a second Ctrl-C cancels the run and raises ``KeyboardInterrupt``.
So ``process`` is just ``run_sync(aprocess(...))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dfbatch.execute._pump import Pump

T = TypeVar("T")
_PUMP_S = 0.05  # the longest a waiting kernel cell sleeps between looks for widget messages
_IN_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("dfbatch_in_run", default=False)


def mark_run() -> contextvars.Token[bool]:
    """Mark the current context as a dfbatch run (the pool's tasks inherit the mark); pass
    the token to ``unmark_run`` when the run ends (``aprocess`` runs in its caller's task)."""
    return _IN_RUN.set(True)


def unmark_run(token: contextvars.Token[bool]) -> None:
    _IN_RUN.reset(token)


class _Interrupt:
    """The graceful stop the first Ctrl-C calls (None: Ctrl-C raises ``KeyboardInterrupt``);
    ``clicks``: widget clicks reach the run while the caller blocks (a pumped kernel)."""

    def __init__(self, clicks: bool = False) -> None:
        self.stop: Callable[[], None] | None = None
        self.clicks = clicks

    def __call__(self) -> None:
        if self.stop is None:
            raise KeyboardInterrupt
        self.stop()


_TARGET: contextvars.ContextVar[_Interrupt | None] = contextvars.ContextVar(
    "dfbatch_interrupt", default=None)


def on_interrupt(stop: Callable[[], None]) -> bool:
    """Make the first Ctrl-C call ``stop``, when this runs under ``run_sync``.

    Returns True when a Stop button cannot reach the run: under ``run_sync`` with nothing that
    delivers widget clicks while the caller blocks (outside a kernel it knows).
    """
    target = _TARGET.get()
    if target is None:
        return False
    target.stop = stop
    return not target.clicks


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result.

    >>> import asyncio
    >>> async def answer():
    ...     await asyncio.sleep(0)
    ...     return 42
    >>> run_sync(answer())
    42
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        return _run_own_loop(coro, _Interrupt())
    if _IN_RUN.get():  # called by the fn of a run in progress: no kernel messages to pump
        return _run_in_thread(coro, _Interrupt())
    from dfbatch.execute._pump import open_pump

    pump = open_pump()  # in a notebook cell: widget clicks reach the run while it blocks
    return _run_in_thread(coro, _Interrupt(clicks=pump is not None), pump)


def _run_own_loop(coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt,
                  loop: asyncio.AbstractEventLoop | None = None,
                  box: dict[str, Any] | None = None) -> T:
    loop = loop or asyncio.new_event_loop()
    try:
        return _run_on(loop, coro, on_interrupt, box)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _run_in_thread(coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt,
                   pump: Pump | None = None) -> T:
    """Run ``coro`` on a fresh loop in a worker thread and wait for it, pumping the kernel's
    widget messages meanwhile (``pump``). The first Ctrl-C stops it gracefully, a second one
    cancels it and raises ``KeyboardInterrupt``."""
    box: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    ctx = contextvars.copy_context()  # the caller's (a kernel routes output by context)

    done = threading.Event()  # (not Thread.join: a join cut by Ctrl-C may lose the thread)

    def target() -> None:
        try:
            box["value"] = ctx.run(_run_own_loop, coro, on_interrupt, loop, box)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name="dfbatch-run", daemon=True)
    thread.start()
    try:
        with _interruptible():
            _wait_stopping(done, pump, loop, box, on_interrupt)
    finally:
        if pump is not None:
            pump.close()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _wait_stopping(done: threading.Event, pump: Pump | None, loop: asyncio.AbstractEventLoop,
                   box: dict[str, Any], on_interrupt: _Interrupt) -> None:
    try:
        _wait(done, pump)
    except KeyboardInterrupt:  # the first Ctrl-C stops the run gracefully
        if on_interrupt.stop is None:
            _cancel(loop, box)
            raise
        _soon(loop, on_interrupt)
        try:
            _wait(done, pump)
        except KeyboardInterrupt:  # a second one cancels it (paid answers: exc.partial)
            _cancel(loop, box)
            _wait(done, pump)
            interrupt = KeyboardInterrupt()
            partial = getattr(box.get("error"), "partial", None)
            if partial is not None:
                interrupt.partial = partial  # type: ignore[attr-defined]
            raise interrupt from None


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` in this (main) thread while it waits, even where
    SIGINT was ignored or handled elsewhere (a kernel raises it too)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait(done: threading.Event, pump: Pump | None) -> None:
    if pump is None:
        while not done.wait(0.5):
            pass
        return
    while not done.is_set():  # wakes for a message, else a few times a second only
        pump.idle(_PUMP_S)
        pump.poll()


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
        loop.call_soon_threadsafe(callback)


def _cancel(loop: asyncio.AbstractEventLoop, box: dict[str, Any]) -> None:
    task = box.get("task")
    if task is not None:
        _soon(loop, task.cancel)


def _run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt,
    box: dict[str, Any] | None = None,
) -> T:
    ctx = contextvars.copy_context()
    ctx.run(_TARGET.set, on_interrupt)
    task = ctx.run(loop.create_task, coro)  # the task (and only it) sees its _Interrupt
    if box is not None:
        box["task"] = task  # (a second Ctrl-C in the waiting thread cancels it)
    try:
        with _sigint(loop, on_interrupt):
            return loop.run_until_complete(task)
    finally:
        if not task.done():  # a second Ctrl-C: cancel everything, leave no pending task behind
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)


@contextlib.contextmanager
def _sigint(loop: asyncio.AbstractEventLoop, on_interrupt: _Interrupt) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal hits
        hits += 1
        if hits > 1 or on_interrupt.stop is None:  # (nothing to stop yet: e.g. still planning)
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(on_interrupt)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
