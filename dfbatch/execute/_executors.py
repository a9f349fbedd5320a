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
    ``workers`` at most at once), in a pool of ``workers`` processes (``"process"``: CPU-bound
    work; fn and its batches are pickled), or on the loop's own thread (``"inline"``: a cheap
    fn pays no thread hop; it blocks the loop while it runs, so no timeout can cut it). Keeps
    the ids of batches whose calls outlived their await (a thread cannot be stopped)."""

    def __init__(self, workers: int, executor: str = "thread") -> None:
        self.workers, self.executor = workers, executor
        self.pool: Executor | None = None
        self.outlived: list[tuple[Future[Any], int]] = []
        # calls wait here, not in the pool's queue: a call's timeout counts from its start
        self.slots: asyncio.Semaphore | None = None
        self.warming: list[Future[Any]] = []  # a new process pool's workers starting up
        self.answered = False  # a call of fn has returned (worker deaths may be rows' doing)

    def _new_processes(self) -> Executor:
        """A process pool whose workers start now (one trivial call each): calls wait for
        them, so a worker's start (seconds under load: spawn, imports) is not timed."""
        pool = _processes(self.workers)
        self.warming = [pool.submit(_worker_up) for _ in range(self.workers)]
        return pool

    async def ready(self) -> None:
        """Wait for a new process pool's workers to start (before the run's first call);
        ConfigError if they cannot, twice: each would die before calling fn."""
        if not await self._started() and self.pool is not None:  # (a Ctrl-C as they started?)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_processes()
        if not await self._started():
            msg = ("executor='process': the worker processes exit while starting, before any "
                   "call of fn. A script's top-level code runs again in each worker (they "
                   "import __main__): put it under `if __name__ == \"__main__\":`; or an import "
                   "fails in a new process. Or use executor='thread'")
            raise ConfigError(msg)

    async def _started(self) -> bool:
        """Wait for the workers of a new process pool to start; False if they could not."""
        warming = self.warming
        if not warming:
            return True
        got = await asyncio.gather(*map(asyncio.wrap_future, warming), return_exceptions=True)
        if self.warming is warming:
            self.warming = []
        return not any(isinstance(g, BaseException) for g in got)

    def open(self) -> None:
        if self.pool is None and self.executor == "process":
            self.pool = self._new_processes()
        elif self.pool is None and self.executor == "thread":
            self.pool = DaemonThreads(self.workers)

    def close(self) -> list[int]:
        running = sorted({bid for fut, bid in self.outlived if not fut.done()})
        if self.pool is not None:
            # a process can be stopped (a thread cannot): a call past its timeout would keep
            # the interpreter from exiting until it ends
            procs = _workers(self.pool) if running else []
            self.pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.terminate()
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
            if self.warming:  # (workers that cannot start break the pool: below)
                await self._started()
            pool = self.pool
            assert pool is not None
            fut: Future[Any] | None = None
            try:  # (a broken pool refuses the submit itself)
                fut = (pool.submit(fn, df) if self.executor == "process"
                       else pool.submit(contextvars.copy_context().run, fn, df))
                value = await timed(asyncio.wrap_future(fut), timeout)
                self.answered = True
                return value
            except (KeyboardInterrupt, SystemExit) as exc:  # fn's: the run attaches .partial
                raise FnInterrupt(exc) from exc
            except BrokenProcessPool as exc:
                if self.pool is pool:  # the first call to see it replaces the pool
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new_processes()
                msg = ("a worker process died during the call (fn crashed it: os._exit, a "
                       "segfault, out of memory); the batch is retried in a new worker")
                raise WorkerDiedError(msg, rows_suspect=self.answered) from exc
            finally:
                if fut is not None and not fut.done():  # timed out or cancelled: a
                    self.outlived.append((fut, batch_id))  # thread cannot be stopped


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
