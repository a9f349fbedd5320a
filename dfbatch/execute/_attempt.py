"""The parts of one fn call: its pass through the breaker, its timeout, how it is awaited.

``Grant`` holds what one plain call needs (the agent's bytes, the run's limits, the breaker's
pass), taken without a coroutine when nothing must wait, and frees a breaker pass the call left
unrecorded. ``call_paced`` runs an fn that charges each of its requests (``Pace``: the timeout
counts from the last request sent). ``timed`` awaits with a timeout; ``is_async`` tells an
async fn (or callable object) from a plain one; ``size_related`` tells errors a smaller batch
could have avoided.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import polars as pl

from dfbatch.errors import ConfigError, FnInterrupt, RetryableError
from dfbatch.execute._breaker import Breaker, Health, Ticket
from dfbatch.execute._charge import Binding, bind_run_limits
from dfbatch.execute._limits import CapacityLimit, Cost, Hold, Limits
from dfbatch.execute._threads import DaemonThreads


@dataclass(slots=True)
class Pass:
    """One call's pass through the breaker (``ticket`` None: no breaker for this call)."""

    breaker: Breaker | None
    ticket: Ticket | None
    done: bool = False

    def record(self, health: Health) -> None:
        if self.breaker is not None and self.ticket is not None and not self.done:
            self.breaker.record(self.ticket, health)
            self.done = True


_NO_BREAKER = Pass(None, None)  # (never recorded: shared by every call without a breaker)
_NOT_YET = Pass(None, None)  # a grant that holds no pass yet


class Grant(Hold):
    """One attempt's hold on the agent's bytes in flight (``nbytes``), the run's ``limits``
    (``outcome`` reaches them at release, as ``Hold``'s) and the breaker's pass (``ticket``),
    taken in that order: the breaker last, so a call that waited for a bucket while the
    service went down does not go out then.

    ``try_enter()`` takes everything at once, without a coroutine, when nothing must wait
    (the common case); else ``await enter()`` waits for the rest, in the same order. A
    cancelled or failed ``enter`` leaves nothing held; ``release()`` frees everything held
    (an unrecorded pass too), once, on every path:
    ``if not g.try_enter(): await g.enter()`` then ``try: ... finally: g.release()``.

    Examples
    --------
    >>> import asyncio
    >>> from dfbatch.execute._limits import CapacityLimit, Cost, Limits
    >>> async def demo():
    ...     nbytes, slots = CapacityLimit(100), CapacityLimit(1)
    ...     first = Grant(Limits([slots]), Cost(nbytes=10), nbytes, None)
    ...     second = Grant(Limits([slots]), Cost(nbytes=10), nbytes, None)
    ...     at_once = first.try_enter(), second.try_enter()  # one slot: the second waits
    ...     waiting = asyncio.ensure_future(second.enter())
    ...     first.release(); await waiting; second.release()
    ...     return at_once, slots.in_use, nbytes.in_use
    >>> asyncio.run(demo())
    ((True, False), 0.0, 0.0)
    """

    __slots__ = ("breaker", "bytes_held", "nbytes", "ticket")

    def __init__(self, limits: Limits, cost: Cost, nbytes: CapacityLimit,
                 breaker: Breaker | None) -> None:
        self.limit, self.cost, self.held = limits, cost, False
        self.outcome = None
        self.nbytes, self.breaker, self.bytes_held = nbytes, breaker, False
        self.ticket = _NOT_YET

    def try_enter(self) -> bool:
        """Take the bytes, the limits (all or none) and the pass now, as far as each can
        pay without a wait; True when everything is held (call it once, first)."""
        cost = self.cost
        if not self.nbytes.try_acquire(cost):
            return False
        self.bytes_held = True
        try:
            if not self.limit.try_acquire(cost):
                return False
        except BaseException:  # (a limit that fails gets nothing held back)
            self.release()
            raise
        self.held = True
        breaker = self.breaker
        if breaker is None:
            self.ticket = _NO_BREAKER
            return True
        ticket = breaker.try_pass()
        if ticket is None:
            return False
        self.ticket = Pass(breaker, ticket)
        return True

    async def enter(self) -> Grant:
        """Wait for what ``try_enter`` could not take (all of it when it was not called)."""
        cost = self.cost
        try:
            if not self.bytes_held:
                if not self.nbytes.try_acquire(cost):
                    await self.nbytes.acquire(cost)
                self.bytes_held = True
                self.held = self.limit.try_acquire(cost)
            if not self.held:  # (its all-or-none try failed: wait limit by limit)
                await self.limit.acquire(cost)
                self.held = True
            if self.ticket is _NOT_YET:
                breaker = self.breaker
                if breaker is None:
                    self.ticket = _NO_BREAKER
                else:
                    ticket = breaker.try_pass()
                    self.ticket = Pass(breaker, ticket if ticket is not None
                                       else await breaker.wait())
        except BaseException:
            self.release()
            raise
        return self

    async def __aenter__(self) -> Grant:
        if not self.try_enter():
            await self.enter()
        return self

    async def reacquire(self) -> None:
        await self.enter()

    def release(self) -> None:
        ticket, self.ticket = self.ticket, _NOT_YET
        if ticket.breaker is not None and not ticket.done:
            ticket.breaker.cancel(ticket.ticket)  # type: ignore[arg-type]
        if self.held:
            self.held = False
            self.limit.release(self.cost, self.outcome)
        if self.bytes_held:
            self.bytes_held = False
            self.nbytes.release(self.cost)


async def call_paced(fn: Callable[[pl.DataFrame], Any], df: pl.DataFrame, timeout: float,  # noqa: ASYNC109
                     binding: Binding) -> Any:
    """Call an fn that charges per request: the timeout counts from its last request sent,
    not from the call's start (its requests may wait for the run's limits meanwhile)."""
    async with asyncio.timeout(timeout) as deadline:
        pace = Pace(deadline, timeout)
        try:
            with bind_run_limits(binding.limits, breaker=binding.breaker, pace=pace):
                value = await fn(df)
            if inspect.isawaitable(value):
                value = await value
            return value
        finally:  # requests fn left running (a gather that raised) no longer move it
            pace.over = True


class Pace:
    """A per-request fn's call timeout: it counts from the last request sent, and stops while
    the call's requests only wait for the run's limits, pause or breaker (none in flight)."""

    def __init__(self, deadline: asyncio.Timeout, timeout: float) -> None:
        self.deadline, self.timeout = deadline, timeout
        self.loop = asyncio.get_running_loop()
        self.waits = self.flying = 0
        self.over = False  # the call ended: its deadline can no longer be moved

    def waiting(self) -> None:
        self.waits += 1
        self._update()

    def sent(self) -> None:
        self.waits -= 1
        self.flying += 1
        if not self.over:
            self.deadline.reschedule(self.loop.time() + self.timeout)

    def ended(self, sent: bool) -> None:
        if sent:
            self.flying -= 1
        else:
            self.waits -= 1
        self._update()

    def _update(self) -> None:
        if self.over or self.deadline.expired():
            return
        if self.waits and not self.flying:
            self.deadline.reschedule(None)
        elif self.deadline.when() is None:
            self.deadline.reschedule(self.loop.time() + self.timeout)


async def timed(aw: Any, timeout: float | None) -> Any:  # noqa: ASYNC109 (the run's setting)
    """Await with a timeout, in this task (no extra task per call)."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(timeout):
        return await aw


_SIZE_WORDS = ("context length", "context_length", "too many tokens", "too large", "maximum")


def size_related(exc: BaseException, status: int | None) -> bool:
    """Could a smaller batch have avoided this error? (timeouts, 413, context-length 400s)"""
    if isinstance(exc, TimeoutError) or status == 413:
        return True
    text = str(exc).lower()
    return status in (400, None) and any(w in text for w in _SIZE_WORDS)


def is_async(fn: Callable[..., Any]) -> bool:
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


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
