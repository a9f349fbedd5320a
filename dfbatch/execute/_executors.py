"""Where a plain (sync) fn's calls run: ``InThreads`` (``executor``: worker threads, worker
processes, or inline on the loop's thread), and the checks a process pool needs first.
``timed`` awaits with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import polars as pl

from dfbatch.errors import ConfigError, FnInterrupt, RetryableError
from dfbatch.execute._threads import DaemonThreads


async def timed(aw: Any, timeout: float | None) -> Any:  # noqa: ASYNC109 (the run's setting)
    """Await with a timeout, in this task (no extra task per call)."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(timeout):
        return await aw


class InThreads:
    """A plain fn's calls (``executor``): each in a daemon worker thread (``"thread"``,
    ``workers`` at most at once), in one of ``workers`` worker processes (``"process"``:
    CPU-bound work; fn and its batches are pickled; see ``Processes``), or on the loop's own
    thread (``"inline"``: a cheap fn pays no thread hop; it blocks the loop while it runs, so
    no timeout can cut it).

    Calls wait for a free worker here, not in a pool's queue, so a call's timeout counts from
    its start, not from its wait. A call past its timeout (or cancelled) in a process has its
    worker killed and replaced; one in a thread (which cannot be stopped) is abandoned, and the
    thread pool gets a thread more while it runs (``DaemonThreads.abandon``). Keeps the ids of
    batches whose calls outlived their await (``close`` returns those still running)."""

    def __init__(self, workers: int, executor: str = "thread") -> None:
        self.workers, self.executor = workers, executor
        self.pool: DaemonThreads | None = None
        self.procs: Processes | None = None
        self.outlived: list[tuple[Future[Any], int]] = []
        self.slots: asyncio.Semaphore | None = None  # (made on the run's loop)

    async def ready(self) -> None:
        """Wait for the worker processes to start (before the run's first call)."""
        if self.procs is not None:
            await self.procs.ready()

    def open(self) -> None:
        if self.procs is None and self.executor == "process":
            self.procs = Processes(self.workers)
        elif self.pool is None and self.executor == "thread":
            self.pool = DaemonThreads(self.workers)

    def close(self) -> list[int]:
        """Stop the workers; the ids of batches whose calls still run (stuck threads)."""
        running = sorted({bid for fut, bid in self.outlived if not fut.done()})
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.procs is not None:
            self.procs.close()
        return running

    async def call(self, fn: Callable[[pl.DataFrame], Any], df: pl.DataFrame,
                   timeout: float | None, batch_id: int) -> Any:  # noqa: ASYNC109
        if self.executor == "inline":
            try:
                return fn(df)
            except (KeyboardInterrupt, SystemExit) as exc:
                raise FnInterrupt(exc) from exc
            except RuntimeError as exc:
                if not loop_clash(exc):
                    raise
                msg = (f"executor='inline' runs fn on the event loop's thread, where fn cannot "
                       f"run a loop of its own ({exc}); pass executor='thread' (fn runs in "
                       "worker threads, where asyncio.run works), or make fn async def and "
                       "await the coroutine instead of asyncio.run(...)")
                raise RuntimeError(msg) from exc
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.workers)
        async with self.slots:
            try:
                if self.procs is not None:
                    return await self.procs.call(fn, df, timeout)
                pool = self.pool
                assert pool is not None
                fut = pool.submit(contextvars.copy_context().run, fn, df)
                try:
                    return await timed(asyncio.wrap_future(fut), timeout)
                finally:
                    if not fut.done():  # timed out or cancelled: a thread cannot be stopped
                        self.outlived.append((fut, batch_id))
                        pool.abandon(fut)  # (the calls after it get a thread of their own)
            except (KeyboardInterrupt, SystemExit) as exc:  # fn's: the run attaches .partial
                raise FnInterrupt(exc) from exc


class Processes:
    """``workers`` worker processes, each a one-process ``ProcessPoolExecutor`` of its own,
    so that one of them can be killed without breaking the calls running in the others.

    ``call`` runs fn in a free worker (the caller makes sure one is: at most ``workers`` calls
    at once), after it has started (a worker's start -- seconds under load: spawn, imports --
    is not timed). A call past its timeout, or cancelled, cannot be stopped in any other way:
    its worker is killed (``SIGKILL``) and replaced by a new one, which starts at once. A
    worker that dies during a call (fn crashed it) fails that call alone (``WorkerDiedError``,
    retried) and is replaced. ``close`` stops every worker: the idle ones exit, those still
    starting are killed; the executors reap them (no process is left behind).
    """

    def __init__(self, workers: int) -> None:
        self.free = [_Worker() for _ in range(workers)]
        self.answered = False  # a call of fn has returned (worker deaths may be rows' doing)

    async def ready(self) -> None:
        """Wait for the workers to start; those that could not are replaced once (a Ctrl-C
        as they started?); ConfigError if they cannot start again: each would die before
        calling fn."""
        for attempt in range(2):
            started = await asyncio.gather(*(w.started() for w in self.free))
            if all(started):
                return
            if attempt == 0:
                self.free = [w if ok else w.replaced()
                             for w, ok in zip(self.free, started, strict=True)]
        msg = ("executor='process': the worker processes exit while starting, before any "
               "call of fn. A script's top-level code runs again in each worker (they "
               "import __main__): put it under `if __name__ == \"__main__\":`; or an import "
               "fails in a new process. Or use executor='thread'")
        raise ConfigError(msg)

    async def call(self, fn: Callable[[pl.DataFrame], Any], df: pl.DataFrame,
                   timeout: float | None) -> Any:  # noqa: ASYNC109
        free = self.free  # (one that has started, if any: the last used first)
        worker = free.pop(next((i for i in reversed(range(len(free))) if free[i].up.done()),
                               len(free) - 1))
        fut: Future[Any] | None = None
        try:
            await worker.started()  # (one that could not start is broken: the submit says so)
            fut = worker.pool.submit(fn, df)  # (a broken pool refuses the submit itself)
            value = await timed(asyncio.wrap_future(fut), timeout)
            self.answered = True
            return value
        except BrokenProcessPool as exc:
            worker = worker.replaced()
            msg = ("a worker process died during the call (fn crashed it: os._exit, a "
                   "segfault, out of memory); the batch is retried in a new worker")
            raise WorkerDiedError(msg, rows_suspect=self.answered) from exc
        finally:
            if fut is not None and not fut.done():  # timed out or cancelled: kill it
                worker = worker.replaced(kill=True)
            self.free.append(worker)

    def close(self) -> None:
        for worker in self.free:
            worker.stop(kill=not worker.up.done())
        self.free = []


class _Worker:
    """One worker process: a one-process pool, started at once (``up``: its first call)."""

    __slots__ = ("pool", "up", "waiter")

    def __init__(self) -> None:
        self.pool = _processes(1)
        self.up: Future[Any] = self.pool.submit(_worker_up)
        self.waiter: asyncio.Future[Any] | None = None  # ``up`` on the loop (one for all)

    async def started(self) -> bool:
        """Wait for the process to start (a call cancelled meanwhile leaves it starting);
        False if it could not."""
        if not self.up.done():
            if self.waiter is None:
                self.waiter = asyncio.wrap_future(self.up)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.waiter)
        return self.up.cancelled() or self.up.exception() is None

    def replaced(self, *, kill: bool = False) -> _Worker:
        """Stop this worker (``kill``: at once, whatever it runs); a new one, starting."""
        self.stop(kill=kill)
        return _Worker()

    def stop(self, *, kill: bool) -> None:
        """Let the process exit once idle, or (``kill``) kill it now; the pool's manager
        thread reaps it either way."""
        if self.waiter is not None:  # (it would be told on a loop that may be closed by then)
            self.waiter.cancel()
        procs = _workers(self.pool) if kill else []
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)


_LOOP_CLASH = ("from a running event loop", "loop is already running",
               "another loop is running")


def loop_clash(exc: RuntimeError) -> bool:
    """Is ``exc`` asyncio refusing to run a loop on a thread whose loop runs (``asyncio.run``,
    ``run_until_complete`` called inside a running loop)?

    >>> loop_clash(RuntimeError("asyncio.run() cannot be called from a running event loop"))
    True
    >>> loop_clash(RuntimeError("dictionary changed size during iteration"))
    False
    """
    text = str(exc)
    return any(words in text for words in _LOOP_CLASH)


class WorkerDiedError(RetryableError):
    """A worker process of ``executor="process"`` died during a call (transient: retried).
    ``rows_suspect``: other calls were answered, so a row may be what kills it (a batch that
    keeps dying is bisected; not while every call dies: that would only multiply them)."""

    def __init__(self, message: str, *, rows_suspect: bool = False) -> None:
        super().__init__(message)
        self.rows_suspect = rows_suspect


def check_importable(fn: Callable[..., Any]) -> None:
    """Can a fresh worker process import ``fn``'s module? It imports it anew from
    ``sys.path`` (which it inherits), so a module loaded from a file path
    (``spec_from_file_location``), made in memory, or whose file is gone since, would break
    every worker: ConfigError before the run (``__main__`` is ``_check_pickles``'s)."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if not isinstance(module, str) or module == "__main__":
        return
    spec = getattr(sys.modules.get(module), "__spec__", None)
    why = None
    if (spec is not None and spec.has_location and spec.origin
            and not os.path.exists(spec.origin)):
        why = f"its file {spec.origin!r} is gone"
    elif not _findable(module.partition(".")[0]):
        why = f"{module.partition('.')[0]!r} is not found on sys.path"
    if why is not None:
        msg = (f"executor='process' sends fn to worker processes, which import its module "
               f"{module!r} anew, but they cannot ({why}); make it importable (a .py module "
               "on sys.path, or an installed package), or use executor='thread'")
        raise ConfigError(msg)


def _findable(name: str) -> bool:
    """Would a new process find the top-level module ``name`` (not from ``sys.modules``)?"""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        try:
            if find is not None and find(name, None) is not None:
                return True
        except Exception:  # a finder that cannot say: let the workers try
            return True
    return False


def _processes(workers: int) -> ProcessPoolExecutor:
    # spawn: forking a process that runs threads (the loop's, polars') can deadlock; workers
    # ignore SIGINT: Ctrl-C stops the run in this process, it does not kill the pool
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_sigint)


def _worker_up() -> int:
    """A worker's first call: it imports this module, so dfbatch and polars, before any fn."""
    return os.getpid()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers(pool: Executor) -> list[Any]:
    """The worker processes of a process pool (no public way before Python 3.14)."""
    return list((getattr(pool, "_processes", None) or {}).values())
