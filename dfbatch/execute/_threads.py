"""Daemon worker threads for a plain (sync) ``fn``.

``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so one call
stuck past its timeout would keep a script from exiting. These threads are daemons: a stuck
call is abandoned at exit. Threads start on demand, up to ``max_workers``, and are reused.

A call stuck past its caller's timeout cannot be stopped; ``abandon(fut)`` gives the pool a
thread more while it runs (up to ``max_stuck`` such calls at once), so the calls after it do
not queue for its thread (their own timeouts running meanwhile). The thread that ran it ends
once it returns (beyond ``max_stuck``, calls queue for the threads left).

Examples
--------
>>> pool = DaemonThreads(2)
>>> pool.submit(sum, [1, 2, 3]).result()
6
>>> pool.shutdown()
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class DaemonThreads(Executor):
    """A bounded pool of daemon threads (an ``Executor``, usable with ``run_in_executor``)."""

    def __init__(self, max_workers: int, name: str = "dfbatch", *,
                 max_stuck: int | None = None) -> None:
        self.max_workers, self.name = max(1, max_workers), name
        self.max_stuck = max(64, self.max_workers) if max_stuck is None else max_stuck
        self.stuck = 0  # calls abandoned (past their timeout) that still run
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
                                      | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            return self.submit(lambda: fn(*args, **kwargs))
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                msg = "submit() after shutdown()"
                raise RuntimeError(msg)
            self._work.put((fut, fn, args))
            if (not self._idle.acquire(blocking=False)
                    and self._threads < self.max_workers + self.stuck):
                self._threads += 1
                threading.Thread(target=self._worker, name=f"{self.name}-{self._threads}",
                                 daemon=True).start()
        return fut

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            del item, fut, fn, args
            with self._lock:  # (a stuck call's thread, its replacement in its place: it
                # ends, unless calls wait -- for a call stuck beyond max_stuck, say)
                if self._threads > self.max_workers + self.stuck and self._work.empty():
                    self._threads -= 1
                    return
            self._idle.release()

    def abandon(self, fut: Future[Any]) -> None:
        """The call of ``fut`` (from ``submit``) is stuck: its caller gave up waiting. While it
        runs, the pool has a thread more (see the module docstring)."""
        with self._lock:
            if fut.done() or self.stuck >= self.max_stuck:
                return
            self.stuck += 1
        fut.add_done_callback(self._unstuck)

    def _unstuck(self, fut: Future[Any]) -> None:
        with self._lock:
            self.stuck -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once they are idle; ``cancel_futures``: drop calls not started.

        Never waits for a running call (``wait`` is accepted for the ``Executor`` interface).
        """
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            for _ in range(self._threads):
                self._work.put(None)
