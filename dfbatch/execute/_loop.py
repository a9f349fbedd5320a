"""Run a coroutine from sync code: in a script (own loop) or inside Jupyter's running loop.

Inside a running loop (a notebook cell) the loop is patched with nest-asyncio2 so a blocking
``process()`` call works; ``await aprocess()`` needs no patch. Inside the ``fn`` of another
run (``mark_run`` marks a run's context), re-entering that run's loop mid-step breaks asyncio's
scheduler, so the inner run gets a fresh loop in a worker thread while the calling fn waits.
While the coroutine runs, the first Ctrl-C (or kernel interrupt) calls the graceful stop the
coroutine registered with ``on_interrupt`` (it returns the partial result; before one is
registered, Ctrl-C raises); a second Ctrl-C raises ``KeyboardInterrupt`` at once. So
``process`` is just ``run_sync(aprocess(...))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_IN_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("dfbatch_in_run", default=False)


def mark_run() -> contextvars.Token[bool]:
    """Mark the current context as a dfbatch run (the pool's tasks inherit the mark); pass
    the token to ``unmark_run`` when the run ends (``aprocess`` runs in its caller's task)."""
    return _IN_RUN.set(True)


def unmark_run(token: contextvars.Token[bool]) -> None:
    _IN_RUN.reset(token)


class _Interrupt:
    """The graceful stop the first Ctrl-C calls (None: Ctrl-C raises ``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.stop: Callable[[], None] | None = None

    def __call__(self) -> None:
        if self.stop is None:
            raise KeyboardInterrupt
        self.stop()


_TARGET: contextvars.ContextVar[_Interrupt | None] = contextvars.ContextVar(
    "dfbatch_interrupt", default=None)


def on_interrupt(stop: Callable[[], None]) -> bool:
    """Make the first Ctrl-C call ``stop``, when this runs under ``run_sync``.

    Returns True under ``run_sync`` (a blocking caller: its loop cannot serve a Stop button).
    """
    target = _TARGET.get()
    if target is None:
        return False
    target.stop = stop
    return True


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
    if _IN_RUN.get():  # called by the fn of a run in progress: do not re-enter its loop
        return _run_in_thread(coro, _Interrupt())
    import nest_asyncio2

    nest_asyncio2.apply(loop)
    return _run_on(loop, coro, _Interrupt())


def _run_own_loop(coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt,
                  loop: asyncio.AbstractEventLoop | None = None) -> T:
    loop = loop or asyncio.new_event_loop()
    try:
        return _run_on(loop, coro, on_interrupt)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _run_in_thread(coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt) -> T:
    """Run ``coro`` on a fresh loop in a worker thread and wait for it (Ctrl-C stops it)."""
    box: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    def target() -> None:
        try:
            box["value"] = _run_own_loop(coro, on_interrupt, loop)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="dfbatch-nested-run", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:  # the first Ctrl-C stops the inner run gracefully
        if on_interrupt.stop is None:
            raise
        with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
            loop.call_soon_threadsafe(on_interrupt)
        thread.join()  # a second one raises here
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], on_interrupt: _Interrupt
) -> T:
    ctx = contextvars.copy_context()
    ctx.run(_TARGET.set, on_interrupt)
    task = ctx.run(loop.create_task, coro)  # the task (and only it) sees its _Interrupt
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
