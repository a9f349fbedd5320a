"""The agent pool: no lost or duplicated rows under faults, errors as values, caps respected."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

import polars as pl
import pytest

import dfbatch
from dfbatch.config import BatchConfig
from dfbatch.errors import RetryableError, StillRunningWarning
from dfbatch.events import BatchFailed, BatchFinished, BatchRetried, BatchStarted, fold
from tests.fakes import FakeAPI, expected, texts

FAST = {"backoff_base": 0.001, "backoff_max": 0.01, "progress": False}


def _counter(ts: list[str]) -> list[int]:
    return [len(t.split()) for t in ts]


def test_fault_mix_every_row_exactly_once() -> None:
    df = texts(400, poison_every=37)
    api = FakeAPI(seed=1, p_retryable=0.15, p_hang=0.03, hang_s=5.0, retry_after=0.02)
    events: list = []
    out = dfbatch.process(df, api, encoding=_counter, agents=4, timeout=0.2, max_attempts=6,
                          on_event=events.append, **FAST)
    assert out.height == df.height
    assert out["id"].to_list() == df["id"].to_list()  # input order, nothing lost
    poison = out.filter(pl.col("text").str.contains("POISON"))
    good = out.filter(~pl.col("text").str.contains("POISON"))
    assert poison.height == 400 // 37
    assert poison["error"].str.starts_with("FatalError: 400").all()
    assert poison["output"].is_null().all()
    assert good["error"].is_null().all(), good.filter(pl.col("error").is_not_null())
    assert good["output"].to_list() == [expected(t) for t in good["text"]]
    # each good row was answered by exactly one successful call
    ok_calls = Counter(t for c in api.calls if c["outcome"] == "ok" for t in c["texts"])
    assert all(ok_calls[t] == 1 for t in good["text"])
    # a poison row's final call contained only itself (bisected down to one row)
    for t in poison["text"]:
        assert any(c["texts"] == [t] for c in api.calls)
    # attempts = calls that included the row
    per_row = Counter(t for c in api.calls for t in c["texts"])
    assert out["attempts"].to_list() == [per_row[t] for t in out["text"]]
    stats = fold(events)
    assert stats.rows_done == 400 and stats.rows_failed == poison.height
    assert stats.retries == sum(isinstance(e, BatchRetried) for e in events) > 0


def test_retry_waits_at_least_retry_after() -> None:
    attempts: dict[str, list[float]] = defaultdict(list)

    async def fn(batch: pl.DataFrame) -> list[str]:
        key = batch["text"][0]
        attempts[key].append(time.monotonic())
        if len(attempts[key]) < 3:
            msg = "slow down"
            raise RetryableError(msg, retry_after=0.15)
        return batch["text"].to_list()

    out = dfbatch.process(texts(8), fn, encoding=_counter, agents=2, **FAST)
    assert out["error"].is_null().all()
    assert set(out["attempts"].to_list()) == {3}
    for stamps in attempts.values():
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert min(gaps) >= 0.15


def test_concurrency_caps_per_agent_and_global() -> None:
    api = FakeAPI(latency=0.02)
    events: list = []
    dfbatch.process(texts(600), api, encoding=_counter, agents=4, items_per_batch=2,
                    max_concurrent_batches=3, max_in_flight=7, on_event=events.append, **FAST)
    assert api.max_in_flight == 7  # the global cap binds (4 agents x 3 > 7) and is reached
    running: Counter[int] = Counter()
    peak: Counter[int] = Counter()
    for ev in events:
        if isinstance(ev, BatchStarted):
            running[ev.agent_id] += 1
            peak[ev.agent_id] = max(peak[ev.agent_id], running[ev.agent_id])
        elif isinstance(ev, (BatchFinished, BatchFailed, BatchRetried)):
            running[ev.agent_id] -= 1
    assert max(peak.values()) <= 3


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("shape", ["list", "series", "frame"])
def test_fn_kinds_and_return_shapes(kind: str, shape: str) -> None:
    def compute(batch: pl.DataFrame) -> object:
        up = batch["text"].str.to_uppercase()
        if shape == "list":
            return up.to_list()
        if shape == "series":
            return up
        return pl.DataFrame({"upper": up, "n": batch["text"].str.len_chars()})

    async def acompute(batch: pl.DataFrame) -> object:
        await asyncio.sleep(0)
        return compute(batch)

    fn = compute if kind == "sync" else acompute
    df = texts(23)
    out = dfbatch.process(df, fn, encoding=_counter, agents=3, **FAST)
    col = "upper" if shape == "frame" else "output"
    assert out[col].to_list() == df["text"].str.to_uppercase().to_list()
    assert out["error"].dtype == pl.Utf8 and out["error"].null_count() == 23
    if shape == "frame":
        assert out["n"].to_list() == df["text"].str.len_chars().to_list()


def test_sync_fn_runs_off_the_loop() -> None:
    import threading

    main = threading.get_ident()
    seen: set[int] = set()

    def fn(batch: pl.DataFrame) -> list[int]:
        seen.add(threading.get_ident())
        time.sleep(0.01)
        return [1] * batch.height

    dfbatch.process(texts(40), fn, encoding=_counter, **FAST)
    assert main not in seen


def test_wrong_length_and_type_are_batch_errors_not_crashes() -> None:
    def fn(batch: pl.DataFrame) -> object:
        if batch["id"][0] == 0:
            return ["only one"]
        if batch["id"][0] == 4:
            return {"not": "a list"}
        return batch["text"].to_list()

    out = dfbatch.process(texts(12), fn, encoding=_counter, agents=1, **FAST)
    errs = out["error"].to_list()
    assert errs[0:4] == [errs[0]] * 4 and "returned 1 outputs for a batch of 4 rows" in errs[0]
    assert "must return one output per row" in errs[4]
    assert out["error"][8:].is_null().all()
    assert out["attempts"].to_list() == [1] * 12  # a bad return is not retried or bisected


def test_raising_fn_bisects_to_the_poison_row() -> None:
    def fn(batch: pl.DataFrame) -> list[str]:
        if (batch["id"] == 5).any():
            msg = "cannot handle row 5"
            raise ValueError(msg)
        return batch["text"].to_list()

    out = dfbatch.process(texts(8), fn, encoding=_counter, agents=1, **FAST)
    assert out.filter(pl.col("error").is_not_null())["id"].to_list() == [5]
    assert out["error"][5] == "ValueError: cannot handle row 5"
    assert out["attempts"][5] == 3  # batch of 4 -> pair -> alone
    assert out["run_batch_id"][5] != out["batch_id"][5]


def test_hanging_fn_times_out_as_error_value() -> None:
    async def fn(batch: pl.DataFrame) -> list[str]:
        if (batch["id"] == 2).any():
            await asyncio.sleep(60)
        return batch["text"].to_list()

    t0 = time.monotonic()
    out = dfbatch.process(texts(4), fn, encoding=_counter, timeout=0.05, max_attempts=2, **FAST)
    assert time.monotonic() - t0 < 5
    assert out["error"][2].startswith("TimeoutError")
    assert out.filter(pl.col("id") != 2)["error"].is_null().all()


def test_oversize_policies() -> None:
    df = pl.DataFrame({"text": ["short", "long " * 50, "tiny"]})
    calls: list[list[str]] = []

    def fn(batch: pl.DataFrame) -> list[int]:
        calls.append(batch["text"].to_list())
        return [len(t) for t in batch["text"]]

    out = dfbatch.process(df, fn, token_limit=20, **FAST)
    assert out["plan_flag"][1] == "oversize"
    assert "token_limit=20" in out["error"][1] and out["attempts"][1] == 0
    assert all("long" not in t for c in calls for t in c)
    calls.clear()
    out = dfbatch.process(df, fn, token_limit=20, oversize="call", **FAST)
    assert out["error"].is_null().all() and out["output"][1] == len("long " * 50)
    calls.clear()
    out = dfbatch.process(df, fn, token_limit=20, oversize="truncate", **FAST)
    assert out["error"].is_null().all()
    assert out["output"][1] < len("long " * 50)
    assert out["text"][1] == "long " * 50  # the result keeps the original text


def test_preplanned_frame_runs_as_planned_and_empty_frame() -> None:
    df = texts(10)
    planned = df.batch.plan(encoding=_counter, items_per_batch=3, agents=2)
    out = planned.batch.process(lambda b: b["id"] * 2, **FAST)
    assert out["batch_id"].to_list() == planned["batch_id"].to_list()
    assert out["run_batch_id"].to_list() == planned["batch_id"].to_list()
    empty = dfbatch.process(pl.DataFrame({"text": []}, schema={"text": pl.Utf8}),
                            lambda b: b["text"], **FAST)
    assert empty.height == 0 and "error" in empty.columns


def test_work_stealing_moves_work_off_a_slow_agent() -> None:
    df = texts(64)
    planned = df.batch.plan(encoding=_counter, items_per_batch=2, agents=2)
    slow_batches = set(planned.filter(pl.col("agent_id") == 0)["batch_id"].to_list())

    async def fn(batch: pl.DataFrame) -> list[int]:
        await asyncio.sleep(0.01)
        return [0] * batch.height

    out = planned.batch.process(fn, max_concurrent_batches=1, **FAST)
    stolen = out.filter(pl.col("run_agent_id") != pl.col("agent_id"))
    assert stolen.height > 0
    out2 = planned.batch.process(fn, max_concurrent_batches=1, steal=False, **FAST)
    assert (out2["run_agent_id"] == out2["agent_id"]).all()
    assert slow_batches  # sanity: the plan used both agents


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(dfbatch.ConfigError, match="fn must be a callable"):
        dfbatch.process(texts(2), "not callable", **FAST)  # type: ignore[arg-type]
    with pytest.raises(dfbatch.ConfigError, match="did you mean 'max_attempts'"):
        dfbatch.process(texts(2), lambda b: b, max_attempt=3, **FAST)


def test_aprocess_inside_a_running_loop() -> None:
    coro = dfbatch.aprocess(texts(9), FakeAPI(), encoding=_counter, **FAST)
    out = asyncio.run(coro)
    assert out["output"].to_list() == [expected(t) for t in texts(9)["text"]]


def test_process_inside_a_running_loop_runs_on_its_own_loop_in_a_worker_thread() -> None:
    seen: list[tuple[str, asyncio.AbstractEventLoop]] = []

    async def fn(batch: pl.DataFrame) -> pl.Series:
        seen.append((threading.current_thread().name, asyncio.get_running_loop()))
        return batch["text"]

    async def inner() -> tuple[pl.DataFrame, asyncio.AbstractEventLoop]:
        df = pl.DataFrame({"text": ["a", "b", "c"]})
        return dfbatch.process(df, fn, progress=False), asyncio.get_running_loop()

    out, outer = asyncio.run(inner())
    assert out["output"].to_list() == ["a", "b", "c"] and out["error"].null_count() == 3
    assert {name for name, _ in seen} == {"dfbatch-run"}
    assert all(loop is not outer for _, loop in seen)  # the caller's loop is not re-entered
    assert not hasattr(outer, "_nest_patched")  # and not patched


def test_retry_after_with_one_slot_per_agent_does_not_deadlock() -> None:
    seen: set[str] = set()

    async def fn(batch: pl.DataFrame) -> pl.Series:
        t = batch["text"][0]
        await asyncio.sleep(0.01)
        if t == "r5" and t not in seen:
            seen.add(t)
            msg = "busy"
            raise RetryableError(msg, retry_after=0.1)
        return batch["text"]

    df = pl.DataFrame({"text": [f"r{i}" for i in range(12)]})
    out = dfbatch.process(df, fn, items_per_batch=1, agents=1, max_concurrent_batches=1,
                          timeout=5, **FAST)
    assert out["output"].to_list() == df["text"].to_list()
    assert out["attempts"][5] == 2


def test_explicit_config_output_tokens_beats_the_adapters() -> None:
    def fn(batch: pl.DataFrame) -> pl.Series:
        return batch["text"]

    fn.dfbatch_output_tokens = 300  # type: ignore[attr-defined]
    events: list = []
    dfbatch.process(texts(8), fn, config=BatchConfig(output_tokens_per_row=7,
                                                     request_overhead_tokens=0),
                    encoding=_counter, on_event=events.append, **FAST)
    df = texts(8)
    words = sum(_counter(df["text"].to_list()))
    started = [e for e in events if isinstance(e, BatchStarted)]
    assert sum(e.tokens for e in started) == words + 7 * 8  # not 300 per row


def test_fn_raising_cancelled_error_is_a_transient_batch_error() -> None:
    calls = 0

    async def fn(batch: pl.DataFrame) -> pl.Series:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError  # e.g. a client library's own cancelled request
        return batch["text"]

    events: list = []
    out = dfbatch.process(texts(4), fn, encoding=_counter, agents=1, on_event=events.append,
                          **FAST)
    assert out["error"].is_null().all() and out["attempts"].to_list() == [2] * 4
    retried = [e for e in events if isinstance(e, BatchRetried)]
    assert len(retried) == 1 and "CancelledError" in retried[0].error


def test_sync_fn_stuck_after_its_timeout_is_named_and_does_not_block_exit() -> None:
    release = threading.Event()

    def fn(batch: pl.DataFrame) -> pl.Series:
        if (batch["id"] == 2).any():
            release.wait(60)
        return batch["text"]

    try:
        with pytest.warns(StillRunningWarning, match=r"batches \[2\]"):
            out = dfbatch.process(texts(4), fn, encoding=_counter, timeout=0.1,
                                  max_attempts=1, agents=1, items_per_batch=1, **FAST)
        assert out["error"][2].startswith("TimeoutError") and out["run_batch_id"][2] == 2
        assert out.filter(pl.col("id") != 2)["error"].is_null().all()
    finally:
        release.set()
    script = (
        "import time, polars as pl, dfbatch\n"
        "def fn(b):\n"
        "    time.sleep(120)\n"
        "df = pl.DataFrame({'text': ['a']})\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "out = dfbatch.process(df, fn, timeout=0.1, max_attempts=1, progress=False)\n"
        "print(out['error'][0])\n"
    )
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert res.stdout.startswith("TimeoutError") and time.monotonic() - t0 < 30
