"""Run a coroutine from sync code: in a script (own loop) or inside Jupyter's running loop.

Inside a running loop (a notebook cell) the loop is patched with nest-asyncio2 so a blocking
``process()`` call works; ``await aprocess()`` needs no patch. While the coroutine runs, the
first Ctrl-C (or kernel interrupt) calls ``on_interrupt`` (a graceful stop that returns the
partial result); a second Ctrl-C raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T], on_interrupt: Callable[[], None]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result.

    >>> import asyncio
    >>> async def answer():
    ...     await asyncio.sleep(0)
    ...     return 42
    >>> run_sync(answer(), on_interrupt=lambda: None)
    42
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        return _run_own_loop(coro, on_interrupt)
    import nest_asyncio2

    nest_asyncio2.apply(loop)
    return _run_on(loop, coro, on_interrupt)


def _run_own_loop(coro: Coroutine[Any, Any, T], on_interrupt: Callable[[], None]) -> T:
    loop = asyncio.new_event_loop()
    try:
        return _run_on(loop, coro, on_interrupt)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], on_interrupt: Callable[[], None]
) -> T:
    task = loop.create_task(coro)
    try:
        with _sigint(loop, on_interrupt):
            return loop.run_until_complete(task)
    finally:
        if not task.done():  # a second Ctrl-C: cancel everything, leave no pending task behind
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)


@contextlib.contextmanager
def _sigint(loop: asyncio.AbstractEventLoop, on_interrupt: Callable[[], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(on_interrupt)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
