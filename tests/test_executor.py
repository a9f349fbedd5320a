"""Where a plain-function fn runs: worker threads (default), the loop's thread, or processes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.errors import ConfigError
from tests.fakes import (
    dies_always,
    dies_on_row_5,
    hangs_on_row_0,
    pid_per_row,
    requests_per_row,
    sleeps_then_pid,
)

QUIET = {"progress": False, "items_per_batch": 4}


def _frame(n: int = 40) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [f"row {i}" for i in range(n)]})


def test_inline_runs_on_the_loop_thread_and_threads_do_not() -> None:
    seen: dict[str, set[int]] = {"inline": set(), "thread": set()}

    def make(key: str):
        def fn(batch: pl.DataFrame) -> list[int]:
            seen[key].add(threading.get_ident())
            return (batch["id"] * 3).to_list()
        return fn

    for key in seen:
        out = dfbatch.process(_frame(), make(key), executor=key, **QUIET)
        assert out["output"].to_list() == [3 * i for i in range(40)]
        assert out["error"].null_count() == 40
    assert seen["inline"] == {threading.get_ident()}  # the loop runs on this thread here
    assert threading.get_ident() not in seen["thread"]


def test_inline_errors_are_row_errors_and_poison_rows_fail_alone() -> None:
    def fn(batch: pl.DataFrame) -> list[int]:
        if 13 in batch["id"].to_list():
            msg = "bad row 13"
            raise ValueError(msg)
        return batch["id"].to_list()

    out = dfbatch.process(_frame(), fn, executor="inline", max_attempts=1, **QUIET)
    bad = out.filter(pl.col("error").is_not_null())
    assert bad["id"].to_list() == [13] and "bad row 13" in bad["error"][0]
    assert out.filter(pl.col("id") != 13)["output"].to_list() == [i for i in range(40) if i != 13]


async def _shout(texts: list[str]) -> list[str]:
    await asyncio.sleep(0)
    return [t.upper() for t in texts]


def _sync_wrapper(batch: pl.DataFrame) -> list[str]:
    """The common way to call async code from a plain fn: asyncio.run."""
    coro = _shout(batch["text"].to_list())
    try:
        return asyncio.run(coro)
    finally:
        coro.close()  # (refused unstarted: no "never awaited" warning)


def test_an_inline_fn_that_runs_its_own_loop_is_told_why_and_what_to_use() -> None:
    out = dfbatch.process(_frame(8), _sync_wrapper, executor="inline", max_attempts=1, **QUIET)
    errors = out["error"].unique().to_list()
    assert len(errors) == 1 and out["output"].null_count() == 8
    assert "executor='inline' runs fn on the event loop's thread" in errors[0]
    assert "executor='thread'" in errors[0] and "async def" in errors[0]
    assert "cannot be called from a running event loop" in errors[0]  # asyncio's own words
    fixed = dfbatch.process(_frame(8), _sync_wrapper, executor="thread", **QUIET)
    assert fixed["output"].to_list() == [f"ROW {i}" for i in range(8)]

    def other(batch: pl.DataFrame) -> list[str]:
        msg = "some other runtime error"
        raise RuntimeError(msg)

    out = dfbatch.process(_frame(4), other, executor="inline", max_attempts=1, **QUIET)
    assert out["error"].unique().to_list() == ["RuntimeError: some other runtime error"]


@pytest.mark.slow
def test_process_executor_runs_in_other_processes() -> None:
    out = dfbatch.process(_frame(), pid_per_row, executor="process", sync_workers=2, **QUIET)
    assert out.height == 40 and out["error"].null_count() == 40
    pids = set(out["output"].to_list())
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_process_executor_refuses_an_fn_its_workers_cannot_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib
    import importlib.util

    code = "def fn(batch):\n    return [1] * batch.height\n"
    (tmp_path / "by_path.py").write_text(code)  # loaded from its path: not on sys.path
    spec = importlib.util.spec_from_file_location("by_path", tmp_path / "by_path.py")
    assert spec is not None and spec.loader is not None
    by_path = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "by_path", by_path)  # (so fn pickles, by name)
    spec.loader.exec_module(by_path)
    opts = dict(executor="process", max_attempts=1, **QUIET)
    with pytest.raises(ConfigError, match=r"module 'by_path' anew.*not found on sys.path"):
        dfbatch.process(_frame(2), by_path.fn, **opts)
    (tmp_path / "gone_since.py").write_text(code)  # imported, then its file removed
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gone_since", raising=False)
    gone_since = importlib.import_module("gone_since")
    (tmp_path / "gone_since.py").unlink()
    with pytest.raises(ConfigError, match=r"gone_since.py' is gone.*executor='thread'"):
        dfbatch.process(_frame(2), gone_since.fn, **opts)


@pytest.mark.slow
def test_the_workers_start_is_not_counted_in_a_calls_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    from dfbatch.execute import _executors

    def slow_start(workers: int) -> ProcessPoolExecutor:  # (a loaded machine: seconds)
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=time.sleep, initargs=(1.5,))

    monkeypatch.setattr(_executors, "_processes", slow_start)
    out = dfbatch.process(_frame(8), pid_per_row, executor="process", sync_workers=1,
                          timeout=1.0, max_attempts=1, **QUIET)
    assert out["error"].null_count() == 8
    assert out["attempts"].to_list() == [1] * 8  # no call timed out (nor was bisected)


def _pool_of_workers_that_exit(workers: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=os._exit, initargs=(3,))  # (as an unguarded script)


def test_workers_that_cannot_start_stop_the_run_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dfbatch.execute import _executors

    monkeypatch.setattr(_executors, "_processes", _pool_of_workers_that_exit)
    with pytest.raises(ConfigError, match=r"exit while starting.*__name__ == .__main__."):
        dfbatch.process(_frame(8), pid_per_row, executor="process", sync_workers=1, **QUIET)


class _BrokenPool(Executor):
    """A process pool that broke between two calls: it refuses every submit but its workers'
    start-up call."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        from dfbatch.execute import _executors

        if fn is _executors._worker_up:
            done: Future[Any] = Future()
            done.set_result(0)
            return done
        msg = "a child process terminated abruptly"
        raise BrokenProcessPool(msg)


def test_a_pool_broken_before_the_submit_is_a_worker_death_and_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dfbatch.execute import _executors

    monkeypatch.setattr(_executors, "_processes", lambda workers: _BrokenPool())
    threads = _executors.InThreads(1, "process")
    threads.open()
    assert threads.procs is not None
    broken = threads.procs.free[0].pool
    with pytest.raises(_executors.WorkerDiedError, match="retried in a new worker"):
        asyncio.run(threads.call(len, pl.DataFrame(), None, 0))
    assert threads.procs.free[0].pool is not broken  # (kept before: every later call failed)


def test_process_executor_refuses_an_fn_that_does_not_pickle() -> None:
    with pytest.raises(ConfigError, match=r"executor='process'.*module level"):
        dfbatch.process(_frame(), lambda b: [1] * b.height, executor="process", **QUIET)


def test_unknown_executor_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"executor must be 'thread'.*'inline'.*'process'"):
        dfbatch.process(_frame(), lambda b: [1] * b.height, executor="fast", **QUIET)


@pytest.mark.slow
def test_a_row_that_kills_its_worker_process_fails_alone() -> None:
    out = dfbatch.process(_frame(), dies_on_row_5, executor="process", sync_workers=2,
                          max_attempts=4, **QUIET)
    bad = out.filter(pl.col("error").is_not_null())
    # the dead worker is replaced, so the run goes on (it lost 168 of 200 rows to one dying
    # row before), and a batch whose worker died max_attempts times is bisected (as under
    # engine="ray"): the row that kills it fails alone (its 3 batch-mates failed with it
    # before). Each worker is a pool of its own: a death no longer breaks the calls in
    # flight beside it (retried before)
    assert bad["id"].to_list() == [5]
    assert bad["error"].str.contains("WorkerDiedError").all()
    good = out.filter(pl.col("error").is_null())
    assert good["output"].to_list() == (good["id"] * 2).to_list()
    dying = out.filter(pl.col("id") == 5)["batch_id"].item()
    assert (out.filter(pl.col("batch_id") != dying)["attempts"] == 1).all()


@pytest.mark.slow
def test_a_batch_is_not_bisected_while_every_call_kills_its_worker() -> None:
    out = dfbatch.process(_frame(4), dies_always, executor="process", sync_workers=1,
                          max_attempts=2, **QUIET)  # (no row is at fault: no answer at all)
    assert out["error"].str.contains("WorkerDiedError").all()
    assert out["attempts"].to_list() == [2] * 4  # one batch, tried twice, not split


def test_an_fn_of_an_interactive_main_is_refused_for_processes(monkeypatch) -> None:
    import sys
    import types

    main = types.ModuleType("__main__")  # a notebook's, a REPL's: no file to import
    monkeypatch.setitem(sys.modules, "__main__", main)

    def fn(batch: pl.DataFrame) -> list[int]:
        return [1] * batch.height

    fn.__module__ = "__main__"
    with pytest.raises(ConfigError, match="interactive session"):
        dfbatch.process(_frame(), fn, executor="process", **QUIET)


def test_the_timeout_counts_from_the_calls_start_not_its_wait_for_a_worker() -> None:
    import time

    def slowish(batch: pl.DataFrame) -> list[int]:
        time.sleep(0.15)
        return [1] * batch.height

    # 10 batches, one worker thread, 0.15 s each: the last starts after ~1.35 s of waiting
    out = dfbatch.process(_frame(), slowish, executor="thread", sync_workers=1, timeout=0.5,
                          hedge_after=None, max_attempts=1, **QUIET)
    assert out["error"].null_count() == 40


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie, dead but not yet reaped, is not)?"""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the dev environment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The processes of ``pids`` still alive ``within`` seconds (they are reaped meanwhile)."""
    import time

    deadline = time.monotonic() + within
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


@pytest.mark.slow
def test_a_hung_call_past_its_timeout_has_its_worker_process_killed_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    # the row with id 0 hangs (60 s) in each of its 2 attempts; the 11 others take 0.2 s each.
    # Its worker is killed at the timeout and replaced: the calls after it do not queue
    # behind it (their timeouts ran while they queued: every one of them timed out)
    monkeypatch.setenv("DFBATCH_TEST_PIDS", str(tmp_path))  # (spawned workers inherit it)
    t0 = time.monotonic()
    out = dfbatch.process(_frame(12), hangs_on_row_0, executor="process", sync_workers=1,
                          timeout=1.5, max_attempts=2, hedge_after=None, progress=False,
                          items_per_batch=1)
    elapsed = time.monotonic() - t0
    hung, others = out.filter(pl.col("id") == 0), out.filter(pl.col("id") != 0)
    assert hung["error"][0].startswith("TimeoutError") and hung["attempts"][0] == 2
    assert others["error"].null_count() == 11, others["error"].drop_nulls().to_list()
    assert others["attempts"].to_list() == [1] * 11
    assert others["output"].to_list() == list(range(1, 12))
    assert elapsed < 30.0  # (the hung calls sleep 60 s each)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) >= 2  # the first worker, killed, and its replacement(s)
    assert _gone(pids) == []  # no worker left behind


@pytest.mark.slow
def test_killing_a_workers_hung_call_leaves_the_call_on_another_worker_alone() -> None:
    from dfbatch.execute import _executors

    def frame(sleep: float) -> pl.DataFrame:
        return pl.DataFrame({"sleep": [sleep]})

    async def run() -> tuple[Any, ...]:
        threads = _executors.InThreads(2, "process")
        threads.open()
        try:
            await threads.ready()
            assert threads.procs is not None
            first = [w.up.result() for w in threads.procs.free]  # (the workers' pids)
            hung = asyncio.ensure_future(threads.call(sleeps_then_pid, frame(60.0), 1.0, 0))
            await asyncio.sleep(0)  # (it takes a worker first)
            beside = asyncio.ensure_future(threads.call(sleeps_then_pid, frame(2.5), 10.0, 1))
            done = await asyncio.gather(hung, beside, return_exceptions=True)
            after = await threads.call(sleeps_then_pid, frame(0.0), 10.0, 2)
            workers = [w.up.result() for w in threads.procs.free]
            return first, done, after, workers
        finally:
            assert threads.close() == []  # (nothing left running: no StillRunningWarning)

    first, (hung, beside), after, workers = asyncio.run(run())
    assert isinstance(hung, TimeoutError)
    assert beside == [beside[0]] and beside[0] in first  # answered, killed beside nothing
    killed = (set(first) - {beside[0]}).pop()
    assert killed not in workers and after[0] in workers and len(set(workers)) == 2
    assert _gone([*first, *workers]) == []


def test_a_thread_stuck_past_its_timeout_does_not_hold_up_the_calls_behind_it() -> None:
    from dfbatch.errors import StillRunningWarning

    release = threading.Event()

    def fn(batch: pl.DataFrame) -> list[int]:
        if 0 in batch["id"].to_list():
            release.wait(30.0)  # (a thread cannot be stopped: stuck until the test ends)
        return batch["id"].to_list()

    # one worker thread: each stuck call gets a new thread, or the calls behind it queue
    # for it, their timeouts running
    try:
        with pytest.warns(StillRunningWarning, match=r"batches \[0\]"):
            out = dfbatch.process(_frame(12), fn, executor="thread", sync_workers=1,
                                  timeout=0.5, max_attempts=2, hedge_after=None,
                                  progress=False, items_per_batch=1)
    finally:
        release.set()
    hung, others = out.filter(pl.col("id") == 0), out.filter(pl.col("id") != 0)
    assert hung["error"][0].startswith("TimeoutError") and hung["attempts"][0] == 2
    assert others["error"].null_count() == 11, others["error"].drop_nulls().to_list()
    assert others["attempts"].to_list() == [1] * 11


def test_daemon_threads_get_a_thread_more_per_abandoned_call_up_to_max_stuck() -> None:
    from dfbatch.execute._threads import DaemonThreads

    pool = DaemonThreads(1, max_stuck=1)
    first, second = threading.Event(), threading.Event()
    try:
        stuck = pool.submit(first.wait, 30.0)
        pool.abandon(stuck)  # its caller gave up: a thread more while it runs
        assert pool.submit(sum, [1, 2]).result(timeout=10) == 3
        also_stuck = pool.submit(second.wait, 30.0)
        pool.abandon(also_stuck)  # (max_stuck reached: no thread more)
        queued = pool.submit(sum, [3, 4])
        assert pool.stuck == 1 and pool._threads == 2 and not queued.done()
        first.set()  # the first stuck call ends: its thread takes the queued call, or ends
        assert queued.result(timeout=10) == 7 and stuck.result(timeout=10) is True
        assert pool.stuck == 0
    finally:
        first.set()
        second.set()
        pool.shutdown()
    assert also_stuck.result(timeout=10) is True
    assert pool._threads <= 2


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_per_request_sync_fn_keeps_the_rate_in_worker_processes_too(executor: str) -> None:
    """A sync fn charging each request with ``dfbatch.limits.request`` in its own loop: in a
    worker process that is outside the run (nothing charged there), so the run charges its
    calls one request per row instead; rpm= holds either way (it did not with processes)."""
    out = dfbatch.process(_frame(30), requests_per_row, executor=executor, sync_workers=2,
                          rpm=1200, **QUIET)  # 20 a second, a bucket of 20 to start
    assert out["error"].null_count() == 30
    sent = sorted(out["output"].to_list())
    # 30 requests: 20 at once, the other 10 at 20 a second (sent only when charged)
    assert sent[-1] - sent[0] >= 0.35
