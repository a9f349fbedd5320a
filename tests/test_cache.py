"""The response cache (``process(..., cache=...)``): exact reuse across runs and processes."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

import dfbatch
from dfbatch.events import RunStarted
from dfbatch.persist._cache_run import namespace, row_keys

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(progress=False, agents=2, items_per_batch=10)


class Counter:
    """fn that upper-cases ``text`` and counts the rows it was asked for."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def __call__(self, batch: pl.DataFrame) -> pl.Series:
        self.rows.extend(batch["text"].to_list())
        return batch["text"].str.to_uppercase()


def frame(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"id": range(start, start + n), "text": [f"row {i}" for i in
                                                                range(start, start + n)]})


def same_answers(a: pl.DataFrame, b: pl.DataFrame) -> None:
    cols = ["id", "text", "output", "error"]
    assert a.select(cols).equals(b.select(cols))


def test_rerun_calls_only_changed_and_new_rows(tmp_path: Path) -> None:
    cache = dfbatch.Cache(tmp_path / "c.sqlite")
    first = Counter()
    df = frame(1000)
    out1 = dfbatch.process(df, first, cache=cache, **FAST)
    assert len(first.rows) == 1000 and not out1["cached"].any()

    changed = df.with_columns(
        pl.when(pl.col("id") < 10).then(pl.col("text") + " v2").otherwise(pl.col("text")))
    new = pl.concat([changed, frame(200, start=1000)])
    second = Counter()
    out2 = dfbatch.process(new, second, cache=cache, **FAST)
    assert len(second.rows) == 210
    assert sorted(second.rows) == sorted([f"row {i} v2" for i in range(10)]
                                         + [f"row {i}" for i in range(1000, 1200)])
    fresh = dfbatch.process(new, Counter(), **FAST)
    same_answers(out2, fresh)
    assert out2["cached"].sum() == 990
    hits = out2.filter("cached")
    assert (hits["attempts"] == 0).all() and hits["run_batch_id"].is_null().all()


def test_fully_cached_rerun_makes_no_call_and_reports_hits(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    df = frame(50)
    dfbatch.process(df, Counter(), cache=path, **FAST)
    again, events = Counter(), []
    out = dfbatch.process(df, again, cache=path, on_event=events.append, **FAST)
    assert again.rows == []
    assert out["output"].to_list() == [t.upper() for t in df["text"]]
    started = [e for e in events if isinstance(e, RunStarted)]
    assert started[0].cached_rows == 50 and started[0].total_rows == 0


def test_refresh_asks_again_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    df = frame(30)
    suffix = ["!"]

    def fn(batch: pl.DataFrame) -> pl.Series:
        return batch["text"] + suffix[0]

    fn.dfbatch_fingerprint = {"version": 1}  # type: ignore[attr-defined]  # its declared identity
    dfbatch.process(df, fn, cache=path, **FAST)
    suffix[0] = "?"  # a non-deterministic fn: the cache keeps the first answer ...
    assert dfbatch.process(df, fn, cache=path, **FAST)["output"].str.ends_with("!").all()
    with dfbatch.Cache(path) as c:
        before = c.info()["entries"]
    os.environ["DFBATCH_CACHE"] = str(path)
    try:  # ... until cache="refresh" asks again and overwrites
        refreshed = dfbatch.process(df, fn, cache="refresh", **FAST)
    finally:
        del os.environ["DFBATCH_CACHE"]
    assert refreshed["output"].str.ends_with("?").all() and not refreshed["cached"].any()
    assert dfbatch.process(df, fn, cache=path, **FAST)["output"].str.ends_with("?").all()
    assert dfbatch.Cache(path).info()["entries"] == before == 30
    suffix[0] = "#"  # Cache(path, refresh=True): the same for a cache of one's own
    again = dfbatch.process(df, fn, cache=dfbatch.Cache(path, refresh=True), **FAST)
    assert again["output"].str.ends_with("#").all()


def failing(batch: pl.DataFrame) -> list[object]:
    CALLS.extend(batch["text"].to_list())
    return [dfbatch.RowError("bad row") if FAIL[0] and t.endswith("7") else t
            for t in batch["text"]]


CALLS: list[str] = []
FAIL = [True]  # the provider's state: a list fn reads is part of its identity, so ...
failing.dfbatch_fingerprint = {"provider": "flaky"}  # type: ignore[attr-defined]  # ... declare it


@pytest.mark.parametrize("cache_errors", [False, True])
def test_errors_are_cached_only_when_asked(tmp_path: Path, cache_errors: bool) -> None:
    df = frame(40)
    CALLS.clear()
    dfbatch.process(df, failing, cache=tmp_path / "c", cache_errors=cache_errors, **FAST)
    CALLS.clear()
    out = dfbatch.process(df, failing, cache=tmp_path / "c", cache_errors=cache_errors, **FAST)
    bad = [t for t in df["text"] if t.endswith("7")]
    assert sorted(CALLS) == ([] if cache_errors else sorted(bad))
    assert out.filter(pl.col("error").is_not_null())["text"].to_list() == bad
    assert out.filter(pl.col("error").is_null())["output"].to_list() == [
        t for t in df["text"] if not t.endswith("7")]


def test_cache_key_names_the_columns_that_decide_the_answer(tmp_path: Path) -> None:
    df = frame(20)
    dfbatch.process(df, Counter(), cache=tmp_path / "c", cache_key=["text"], **FAST)
    again = Counter()  # another id column, same texts: the same answers
    out = dfbatch.process(df.with_columns(pl.col("id") + 100), again, cache=tmp_path / "c",
                          cache_key=["text"], **FAST)
    assert again.rows == [] and out["cached"].all()
    other = Counter()  # without cache_key every input column is part of the key
    dfbatch.process(df.with_columns(pl.col("id") + 100), other, cache=tmp_path / "c", **FAST)
    assert len(other.rows) == 20


def _bits(x: float | None) -> str:
    return "null" if x is None else struct.pack("<d", x).hex()


def test_floats_a_fn_tells_apart_have_their_own_answers(tmp_path: Path) -> None:
    def fn(batch: pl.DataFrame) -> list[str]:
        return [_bits(x) for x in batch["x"]]

    nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]  # a NaN payload
    values = [0.0, -0.0, math.nan, -math.nan, nan, None]
    for i, x in enumerate(values):  # one run per value: each must miss what came before
        out = dfbatch.process(pl.DataFrame({"x": [x]}, schema={"x": pl.Float64}), fn,
                              text=pl.lit("t"), cache=tmp_path / "c", progress=False)
        assert out["output"].to_list() == [_bits(x)] and not out["cached"].any(), i
    again = dfbatch.process(pl.DataFrame({"x": values}, schema={"x": pl.Float64}), fn,
                            text=pl.lit("t"), cache=tmp_path / "c", progress=False)
    assert again["cached"].all() and again["output"].to_list() == [_bits(x) for x in values]


def test_floats_inside_lists_and_structs_are_keyed_by_their_bits() -> None:
    from dfbatch.config import BatchConfig

    cfg = BatchConfig()
    ns = namespace(Counter(), "text", cfg)
    df = pl.DataFrame({"l": [[0.0], [-0.0], [math.nan], [None], None],
                       "s": [{"a": 0.0}, {"a": -0.0}, {"a": math.nan}, {"a": None}, None],
                       "a": [[0.0], [-0.0], [math.nan], [None], None]},
                      schema={"l": pl.List(pl.Float32), "s": pl.Struct({"a": pl.Float64}),
                              "a": pl.Array(pl.Float64, 1)})
    for col in df.columns:
        k1, k2 = row_keys(df.select(col), ns, None, cfg)
        assert len(set(zip(k1.tolist(), k2.tolist(), strict=True))) == 5, col


def test_another_fn_or_output_type_misses(tmp_path: Path) -> None:
    df = frame(10)
    dfbatch.process(df, Counter(), cache=tmp_path / "c", **FAST)
    calls: list[int] = []

    def lower(batch: pl.DataFrame) -> pl.Series:
        calls.append(batch.height)
        return batch["text"].str.to_lowercase()

    out = dfbatch.process(df, lower, cache=tmp_path / "c", **FAST)
    assert sum(calls) == 10 and out["output"].to_list() == df["text"].to_list()


def test_options_without_cache_and_bad_values_are_errors(tmp_path: Path) -> None:
    df = frame(3)
    with pytest.raises(dfbatch.ConfigError, match="cache_key / cache_errors"):
        dfbatch.process(df, Counter(), cache_errors=True, **FAST)
    with pytest.raises(dfbatch.ConfigError, match="cache must be"):
        dfbatch.process(df, Counter(), cache=3, **FAST)
    with pytest.raises(dfbatch.ConfigError, match="max_size"):
        dfbatch.Cache(tmp_path / "c", max_size=0)
    with pytest.raises(dfbatch.ConfigError, match="'txt' not found"):
        dfbatch.process(df, Counter(), cache=tmp_path / "c", cache_key=["txt"], **FAST)


def test_a_writer_backlog_is_not_one_chunk_that_evicts_itself(tmp_path: Path, monkeypatch) -> None:
    # on a loaded machine the writer thread falls behind and finds every batch queued at once;
    # stored as one chunk over max_size, the eviction dropped it whole: the cache came out
    # empty (test_eviction_bounds_the_size, 1 run in ~8 of the full suite)
    from dfbatch.persist._cache_run import CacheRun

    start, close = CacheRun._start, CacheRun.close

    def late_close(self: CacheRun) -> None:
        start(self)  # the writer starts only now: the whole run's answers are queued
        close(self)

    monkeypatch.setattr(CacheRun, "_start", lambda self: None)
    monkeypatch.setattr(CacheRun, "close", late_close)
    cache = dfbatch.Cache(tmp_path / "c", max_size=40_000)
    dfbatch.process(frame(1000), Counter(), cache=cache, **FAST)
    info = cache.info()
    assert 0.5 * 40_000 < info["size"] <= 40_000
    newest = Counter()  # the latest rows are kept
    dfbatch.process(frame(10, start=990), newest, cache=cache, **FAST)
    assert newest.rows == []


def test_unsure_fn_is_refused(tmp_path: Path) -> None:
    lock = __import__("threading").Lock()

    def fn(batch: pl.DataFrame, lock: object = lock) -> list[str]:
        return batch["text"].to_list()

    with pytest.raises(dfbatch.ConfigError, match="dfbatch_fingerprint"):
        dfbatch.process(frame(3), fn, cache=tmp_path / "c", **FAST)


def test_eviction_bounds_the_size(tmp_path: Path) -> None:
    cache = dfbatch.Cache(tmp_path / "c", max_size=40_000)
    dfbatch.process(frame(1000), Counter(), cache=cache, **FAST)
    info = cache.info()
    assert 0 < info["size"] <= 40_000
    assert 0 < info["entries"] < 1000
    newest = Counter()  # the most recently written rows survived, the oldest went first
    dfbatch.process(frame(10, start=990), newest, cache=cache, **FAST)
    assert newest.rows == []
    half = info["size"] // 2
    # (eviction is by chunk, the answers of one write: it may leave nothing)
    assert cache.prune(max_size=half) > 0 and cache.info()["size"] <= half
    left = cache.info()["entries"]  # (the prune may have left nothing)
    assert cache.clear() == left and cache.info()["entries"] == 0


def test_with_checkpoint(tmp_path: Path) -> None:
    cache, ckpt = tmp_path / "c", tmp_path / "ckpt"
    df = frame(100)
    dfbatch.process(df.head(60), Counter(), cache=cache, **FAST)
    second = Counter()
    out = dfbatch.process(df, second, cache=cache, checkpoint=ckpt, **FAST)
    assert len(second.rows) == 40 and out["cached"].sum() == 60
    same_answers(out, dfbatch.process(df, Counter(), **FAST))
    third = Counter()  # the checkpoint holds every row: the 40 called, the 60 cached ...
    out3 = dfbatch.process(df, third, cache=cache, checkpoint=ckpt, **FAST)
    assert third.rows == [] and not out3["cached"].any()
    same_answers(out3, out)
    cache.unlink()  # ... so resuming needs no cache
    fourth = Counter()
    out4 = dfbatch.process(df, fourth, checkpoint=ckpt, **FAST)
    assert fourth.rows == [] and (out4.filter(pl.col("id") < 60)["attempts"] == 0).all()
    same_answers(out4, out)


def test_a_run_stopped_after_its_cache_hits_resumes_without_the_cache(tmp_path: Path) -> None:
    cache, ckpt = tmp_path / "c", tmp_path / "ckpt"
    df = frame(50)
    dfbatch.process(df.head(30), interrupted, cache=cache, **FAST)
    STOP[0] = True  # the run stops at its first uncached batch, after the 30 hits
    try:
        with pytest.raises(KeyboardInterrupt):
            dfbatch.process(df, interrupted, cache=cache, checkpoint=ckpt, **FAST)
    finally:
        STOP[0] = False
    cache.unlink()
    CALLS.clear()
    out = dfbatch.process(df, interrupted, checkpoint=ckpt, **FAST)
    assert sorted(CALLS) == sorted(df["text"][30:].to_list())
    same_answers(out, dfbatch.process(df, Counter(), **FAST))


STOP = [False]


def interrupted(batch: pl.DataFrame) -> pl.Series:
    if STOP[0]:
        raise KeyboardInterrupt
    CALLS.extend(batch["text"].to_list())
    return batch["text"].str.to_uppercase()


interrupted.dfbatch_fingerprint = {"v": 1}  # type: ignore[attr-defined]  # (STOP: not identity)

def test_with_streaming(tmp_path: Path) -> None:
    df = frame(300)
    cache = tmp_path / "c"
    first = Counter()
    dfbatch.process(df.lazy(), first, cache=cache, out=tmp_path / "a.parquet", chunk_rows=100,
                    **FAST)
    again = Counter()
    dfbatch.process(df.lazy(), again, cache=cache, out=tmp_path / "b.parquet", chunk_rows=100,
                    **FAST)
    assert len(first.rows) == 300 and again.rows == []
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    same_answers(a, b)
    assert b["cached"].all() and not a["cached"].any()


def test_struct_outputs_round_trip(tmp_path: Path) -> None:
    def fn(batch: pl.DataFrame) -> pl.DataFrame:
        return pl.DataFrame({"upper": batch["text"].str.to_uppercase(),
                             "n": batch["text"].str.len_chars(),
                             "chars": batch["text"].str.split("")})

    df = frame(25)
    first = dfbatch.process(df, fn, cache=tmp_path / "c", **FAST)
    again = dfbatch.process(df, fn, cache=tmp_path / "c", **FAST)
    assert again["cached"].all()
    assert again.drop("cached", "attempts", "run_batch_id", "run_agent_id", "started_at",
                      "elapsed_s").equals(
        first.drop("cached", "attempts", "run_batch_id", "run_agent_id", "started_at",
                   "elapsed_s"))


_FNS = """
import time
def fn(batch):
    time.sleep(DELAY)
    return batch["text"].str.to_uppercase()
fn.dfbatch_fingerprint = {"name": "upper", "version": 1}
DELAY = 0.0
"""

_WORKER = """
import sys, polars as pl, dfbatch, cachefn
lo, hi, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cachefn.DELAY = float(sys.argv[4])
df = pl.DataFrame({"id": range(lo, hi), "text": [f"row {i}" for i in range(lo, hi)]})
out = dfbatch.process(df, cachefn.fn, cache=path, progress=False, agents=2, items_per_batch=5)
print("done", out["error"].is_not_null().sum())
"""


def _worker(tmp_path: Path, lo: int, hi: int, path: Path, delay: float = 0.0
            ) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    (tmp_path / "cachefn.py").write_text(textwrap.dedent(_FNS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    return subprocess.Popen([sys.executable, str(script), str(lo), str(hi), str(path),
                             str(delay)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _fn(tmp_path: Path) -> Any:
    """The workers' fn, loaded here under the workers' module name (the same identity)."""
    import importlib.util

    (tmp_path / "cachefn.py").write_text(textwrap.dedent(_FNS))
    spec = importlib.util.spec_from_file_location("cachefn", tmp_path / "cachefn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fn


def _read_all(tmp_path: Path, path: Path, df: pl.DataFrame) -> tuple[int, pl.DataFrame]:
    """Every stored entry for ``df``'s rows, decoded (a torn entry would raise)."""
    from dfbatch.config import BatchConfig

    cfg = BatchConfig()
    k1, k2 = row_keys(df, namespace(_fn(tmp_path), "text", cfg), None, cfg)
    hits, pieces, _ = dfbatch.Cache(path).lookup(k1, k2, touch=False)
    frames = [pl.DataFrame(pl.from_arrow(table)).with_columns(pl.Series("pos", rows))
              for rows, table in pieces]
    return len(hits), pl.concat(frames) if frames else pl.DataFrame()


@pytest.mark.slow
def test_two_processes_fill_one_cache(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    procs = [_worker(tmp_path, 0, 3000, path), _worker(tmp_path, 1500, 4500, path)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.strip() == "done 0"
    assert dfbatch.Cache(path).info()["entries"] == 4500  # every key once
    df = frame(4500)
    n, got = _read_all(tmp_path, path, df)
    assert n == 4500
    assert got.sort("pos")["output"].to_list() == [t.upper() for t in df["text"]]


@pytest.mark.slow
def test_kill_9_keeps_what_was_answered(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    proc = _worker(tmp_path, 0, 2000, path, delay=0.02)
    deadline = time.monotonic() + 120
    entries = 0
    while time.monotonic() < deadline and entries < 200:
        time.sleep(0.2)  # polling another process: no event to wait on
        if path.exists():
            with dfbatch.Cache(path) as c:
                entries = c.info()["entries"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert entries >= 200
    df = frame(2000)
    n, got = _read_all(tmp_path, path, df)  # the cache opens and every entry is whole
    assert n >= entries and n < 2000
    assert got["output"].to_list() == [df["text"][int(i)].upper() for i in got["pos"]]
    rest: list[str] = []
    fn = _fn(tmp_path)

    def counted(batch: pl.DataFrame) -> pl.Series:
        rest.extend(batch["text"].to_list())
        return fn(batch)

    counted.dfbatch_fingerprint = fn.dfbatch_fingerprint  # type: ignore[attr-defined]
    counted.__module__, counted.__qualname__ = "cachefn", "fn"
    out = dfbatch.process(df, counted, cache=path, **FAST)
    assert len(rest) == 2000 - n and out["cached"].sum() == n
    assert np.array_equal(out["output"].to_numpy(), df["text"].str.to_uppercase().to_numpy())


def test_summary_counts_cached_rows_and_prices_the_rest(tmp_path: Path) -> None:
    df = frame(100)
    fn = Counter()
    dfbatch.process(df.head(40), fn, cache=tmp_path / "c", **FAST)
    planned = df.batch.plan(items_per_batch=10)
    full = planned.batch.summary(price_in_per_1k=1.0, items_per_batch=10)
    s = planned.batch.summary(fn=fn, cache=tmp_path / "c", price_in_per_1k=1.0,
                              items_per_batch=10)
    assert s.cached == 40 and s.rows == 60 and full.cached == 0
    assert s.cost_in is not None and full.cost_in is not None and s.cost_in < full.cost_in
    assert "40 more rows answered by the cache" in str(s)
    with pytest.raises(dfbatch.ConfigError, match="needs fn="):
        planned.batch.summary(cache=tmp_path / "c")


def test_summary_keys_truncated_rows_as_the_run_does(tmp_path: Path) -> None:
    long = " ".join(["word"] * 80)  # over token_limit: sent truncated
    df = pl.DataFrame({"id": range(20), "text": [f"{i} {long}" if i % 2 else f"row {i}"
                                                 for i in range(20)]})
    opts = dict(token_limit=30, oversize="truncate", items_per_batch=4)
    fn = Counter()
    dfbatch.process(df, fn, cache=tmp_path / "c", progress=False, **opts)
    assert any(len(t) < len(f"1 {long}") for t in fn.rows)  # (some were truncated)
    planned = df.batch.plan(**opts)
    s = planned.batch.summary(fn=fn, cache=tmp_path / "c", **opts)
    again = dfbatch.process(df, fn, cache=tmp_path / "c", progress=False, **opts)
    assert s.cached == again["cached"].sum() == 20


@pytest.mark.parametrize("cache_errors", [False, True])
def test_summary_counts_the_hits_the_run_has(tmp_path: Path, cache_errors: bool) -> None:
    df = pl.concat([frame(40), pl.DataFrame({"id": [40, 41], "text": [None, None]})])
    opts = dict(cache=tmp_path / "c", cache_errors=cache_errors, items_per_batch=10)
    dfbatch.process(df, failing, progress=False, **opts)  # rows ending in 7 fail
    s = df.batch.plan(items_per_batch=10).batch.summary(fn=failing, **opts)
    CALLS.clear()
    again = dfbatch.process(df, failing, progress=False, **opts)
    assert s.cached == again["cached"].sum() == (40 if cache_errors else 36)
    assert len(CALLS) == 40 - s.cached and s.null_text == 2  # null rows: never sent, ...
    nulls = again.filter(pl.col("text").is_null())  # ... never cached: their own error
    assert not nulls["cached"].any() and nulls["error"].str.starts_with("null_text").all()
    with pytest.raises(dfbatch.ConfigError, match="only apply with cache="):
        df.batch.plan().batch.summary(fn=failing, cache_errors=True)


def test_stats_count_hits_apart_from_calls(tmp_path: Path) -> None:
    from dfbatch.events import fold

    df = frame(30)
    dfbatch.process(df.head(20), Counter(), cache=tmp_path / "c", **FAST)
    events: list[object] = []
    dfbatch.process(df, Counter(), cache=tmp_path / "c", on_event=events.append, **FAST)
    stats = fold(events)  # type: ignore[arg-type]
    assert stats.cached_rows == 20 and stats.total_rows == 10 and stats.rows_done == 10
    assert stats.calls == 1  # one batch of the 10 new rows


def test_cli_info_prune_clear(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from dfbatch.cli import main

    path = tmp_path / "c.sqlite"
    rows = frame(50)  # three runs: three chunks at least (eviction is by chunk)
    for part in (rows[:17], rows[17:34], rows[34:]):
        dfbatch.process(part, Counter(), cache=path, **FAST)
    runner = CliRunner()
    got = runner.invoke(main, ["cache", "--path", str(path), "info"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["entries"] == 50
    size = dfbatch.Cache(path).info()["size"]
    got = runner.invoke(main, ["cache", "--path", str(path), "prune", "--max-size",
                               str(size // 2)])
    assert got.exit_code == 0 and "deleted" in got.output
    assert 0 < dfbatch.Cache(path).info()["entries"] < 50
    got = runner.invoke(main, ["cache", "--path", str(path), "clear", "--yes"])
    assert got.exit_code == 0 and dfbatch.Cache(path).info()["entries"] == 0


def test_an_answer_replaces_a_cached_error(tmp_path: Path) -> None:
    df = frame(20)
    dfbatch.process(df, failing, cache=tmp_path / "c", cache_errors=True, **FAST)
    CALLS.clear()
    FAIL[0] = False  # the provider is fixed
    try:  # without cache_errors the errors are asked again ...
        dfbatch.process(df, failing, cache=tmp_path / "c", **FAST)
        assert sorted(CALLS) == ["row 17", "row 7"]
        CALLS.clear()  # ... and their answers replace the stored errors
        out = dfbatch.process(df, failing, cache=tmp_path / "c", cache_errors=True, **FAST)
    finally:
        FAIL[0] = True
    assert CALLS == [] and out["error"].is_null().all()


def test_an_input_column_named_cached_is_an_error(tmp_path: Path) -> None:
    df = frame(3).with_columns(cached=pl.lit(True))
    with pytest.raises(dfbatch.ConfigError, match=r"columns=dfbatch\.Columns"):
        dfbatch.process(df, Counter(), cache=tmp_path / "c", **FAST)
    out = dfbatch.process(df, Counter(), cache=tmp_path / "c",
                          config=dfbatch.BatchConfig(columns=dfbatch.Columns(cached="hit")),
                          **FAST)
    assert out["cached"].all() and not out["hit"].any()


def test_chat_adapter_is_keyed_by_its_prompt_fields(make_sim: Any, tmp_path: Path) -> None:
    from dfbatch.llm import chat

    sim = make_sim(rpm=1000)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=40, base_url=sim.url)
    assert fn.dfbatch_inputs == ("text",)  # type: ignore[attr-defined]
    df = frame(12).with_columns(note=pl.lit("a"))
    first = dfbatch.process(df, fn, cache=tmp_path / "c", **FAST)
    sent = sim.stats.snapshot().requests
    # another column the prompt does not read: the same questions, no request
    again = dfbatch.process(df.with_columns(note=pl.lit("b")), fn, cache=tmp_path / "c", **FAST)
    assert sim.stats.snapshot().requests == sent and again["cached"].all()
    assert again["output"].to_list() == first["output"].to_list()
    other = chat("sim-chat", "Summarize: {text}", max_tokens=40, temperature=0.7,
                 base_url=sim.url)  # another sampling setting: another question
    dfbatch.process(df, other, cache=tmp_path / "c", **FAST)
    assert sim.stats.snapshot().requests > sent


def test_scattered_batches_with_cache_and_checkpoint_map_rows_back(tmp_path: Path) -> None:
    # the pool runs rows in batch order; both journal hooks must map them back to their rows
    n = 40
    planned = pl.DataFrame({"text": [f"t{i}" for i in range(n)]}).batch.plan(items_per_batch=4)
    planned = planned.with_columns(pl.Series("batch_id", [i % 10 for i in range(n)], pl.UInt32))
    calls: list[int] = []

    def fn(b: pl.DataFrame) -> pl.Series:
        calls.append(b.height)
        return b["text"].str.to_uppercase()

    fn.dfbatch_fingerprint = {"v": 1}  # type: ignore[attr-defined]
    cache, ck = str(tmp_path / "c.sqlite"), tmp_path / "ck"
    out = planned.batch.process(fn, cache=cache, checkpoint=ck, progress=False)
    assert out["output"].to_list() == [f"T{i}" for i in range(n)]
    calls.clear()
    again = planned.batch.process(fn, cache=cache, progress=False)
    assert sum(calls) == 0 and again["output"].to_list() == out["output"].to_list()
    resumed = planned.batch.process(fn, checkpoint=ck, progress=False)
    assert sum(calls) == 0 and resumed["output"].to_list() == out["output"].to_list()


class _WhereLooked(dfbatch.Cache):
    """A cache that records whether each lookup ran on a thread running an event loop."""

    on_loop: ClassVar[list[bool]] = []

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().lookup(*args, **kwargs)


def test_the_lookup_runs_off_the_event_loop(tmp_path: Path) -> None:
    cache = _WhereLooked(tmp_path / "c.sqlite")
    df = frame(30)
    dfbatch.process(df, Counter(), cache=cache, **FAST)
    out = asyncio.run(dfbatch.aprocess(df, Counter(), cache=cache, **FAST))
    assert out["cached"].all()
    dfbatch.process(df.lazy(), Counter(), cache=cache, checkpoint=tmp_path / "ck",
                    out=tmp_path / "o.parquet", chunk_rows=10, **FAST)  # (a lookup a chunk)
    assert cache.on_loop == [False] * 5


def test_a_cache_file_another_process_is_creating_is_waited_for(tmp_path: Path) -> None:
    # two processes starting on one new cache file: the switch to WAL needs the file alone,
    # and SQLite answers "database is locked" at once there (no busy handler): the second
    # process's run crashed (test_two_processes_fill_one_cache, about 1 run in 6)
    import sqlite3
    import threading

    from dfbatch.persist import _cache_db

    path = tmp_path / "new.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # (another process, half way through its schema)
    done = threading.Timer(0.3, other.execute, ("COMMIT",))
    done.start()
    t0 = time.monotonic()
    conn = _cache_db.connect(path)
    waited = time.monotonic() - t0
    done.join()
    try:
        assert waited >= 0.25
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
        other.close()
