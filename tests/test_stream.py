"""LazyFrame streaming: chunked planning, overlapping pools with shared limits, Parquet output."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.errors import ColumnError, ConfigError, PartialResultWarning
from dfbatch.run._stream import _Stream

RUN_COLS = ("attempts", "run_batch_id", "run_agent_id", "started_at", "elapsed_s")


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [f"row {i} " + "w " * (i % 7) for i in range(n)]})


def upper(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.to_uppercase()


def test_chunks_give_the_in_memory_result(tmp_path: Path) -> None:
    df = frame(1000)
    out = tmp_path / "out.parquet"
    summary = df.lazy().batch.process(upper, out=out, chunk_rows=128, progress=False,
                                      agents=3, items_per_batch=5)
    assert summary.row(0, named=True) | {"elapsed_s": 0} == {
        "out": str(out), "rows": 1000, "rows_ok": 1000, "rows_failed": 0, "rows_cancelled": 0,
        "chunks": 8, "elapsed_s": 0}
    got = pl.read_parquet(out)
    mem = dfbatch.process(df, upper, progress=False, agents=3, items_per_batch=5)
    assert got.columns == mem.columns
    same = ["id", "text", "n_tokens", "plan_flag", "output", "error"]
    assert got.select(same).equals(mem.select(same))
    # batch ids are unique across chunks: no batch spans two chunks
    chunk_of = got.with_columns(chunk=pl.col("id") // 128)
    assert (chunk_of.group_by("batch_id").agg(pl.col("chunk").n_unique())["chunk"] == 1).all()
    assert got["batch_id"].n_unique() == sum(
        mem_chunk.batch.plan(agents=3, items_per_batch=5)["batch_id"].n_unique()
        for mem_chunk in df.iter_slices(128))


def test_limits_hold_and_chunks_overlap(tmp_path: Path) -> None:
    inflight: Counter[int] = Counter()  # calls in flight per chunk
    peak, overlapped = 0, False

    async def fn(batch: pl.DataFrame) -> list[int]:
        nonlocal peak, overlapped
        ids = batch["id"].to_list()
        chunk = ids[0] // 40
        inflight[chunk] += 1
        peak = max(peak, sum(inflight.values()))
        overlapped |= sum(k > 0 for k in inflight.values()) > 1
        try:  # (a hedge that wins cancels the other copy: it is no longer in flight)
            await asyncio.sleep(0.002 + 0.01 * (ids[0] % 3 == 0))
        finally:
            inflight[chunk] -= 1
        return ids

    summary = frame(400).lazy().batch.process(
        fn, out=tmp_path / "o.parquet", chunk_rows=40, progress=False, agents=2,
        items_per_batch=2, max_in_flight=3)
    assert summary["rows_ok"].item() == 400
    assert peak == 3  # the global in-flight cap holds across two live pools
    assert overlapped  # the next chunk started while the previous one still had calls in flight
    assert pl.read_parquet(tmp_path / "o.parquet")["output"].to_list() == list(range(400))


def test_stream_checkpoint_resumes_chunk_by_chunk(tmp_path: Path) -> None:
    class Crash(BaseException):
        pass

    calls: list[int] = []

    def fn(batch: pl.DataFrame) -> pl.Series:
        if crash_at is not None and batch["id"][0] >= crash_at:
            raise Crash
        calls.extend(batch["id"].to_list())
        return batch["id"] * 10

    fn.dfbatch_fingerprint = {"fn": "id * 10"}  # type: ignore[attr-defined] # crash_at changes
    lf = frame(300).lazy()
    opts = {"out": tmp_path / "o.parquet", "chunk_rows": 100, "checkpoint": tmp_path / "ck",
            "progress": False, "agents": 2, "items_per_batch": 10, "max_in_flight": 1}
    crash_at: int | None = 150
    with pytest.raises(Crash):
        lf.batch.process(fn, **opts)
    assert not (tmp_path / "o.parquet").exists()  # no half-written output
    first = set(calls)
    assert set(range(100)) <= first and max(first) < 150
    crash_at, calls = None, []
    summary = lf.batch.process(fn, **opts)
    assert not first & set(calls)  # only rows not journaled were called
    assert summary["rows_ok"].item() == 300
    got = pl.read_parquet(tmp_path / "o.parquet")
    assert got["output"].to_list() == [i * 10 for i in range(300)]


def test_stop_writes_the_chunks_started(tmp_path: Path) -> None:
    df = frame(400)
    holder: list[_Stream] = []

    async def fn(batch: pl.DataFrame) -> pl.Series:
        if batch["id"][0] >= 130:
            holder[0].stop()  # as the first Ctrl-C does
            await asyncio.sleep(10)
        return batch["id"]

    run = _Stream.create(df.lazy(), fn, "text", tmp_path / "o.parquet", 100, None,
                         {"agents": 2, "items_per_batch": 10},
                         {"checkpoint": None, "resume": "auto", "retry_errors": False, "key": None})
    holder.append(run)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = asyncio.run(run.execute(False, None, stoppable=True))
    assert time.monotonic() - t0 < 5
    assert any(issubclass(w.category, PartialResultWarning) for w in caught)
    got = pl.read_parquet(tmp_path / "o.parquet")
    s = summary.row(0, named=True)
    assert s["rows"] == got.height < 400 and s["rows_cancelled"] > 0
    assert got["id"].to_list() == list(range(got.height))  # whole chunks, in order
    ok = got.filter(pl.col("error").is_null())
    assert (ok["output"] == ok["id"]).all() and ok.height == s["rows_ok"]
    assert (got.filter(pl.col("error").is_not_null())["error"] == "cancelled").all()


def test_bad_arguments_fail_before_reading(tmp_path: Path) -> None:
    lf = frame(10).lazy()
    with pytest.raises(ConfigError, match="does not exist; create it"):
        lf.batch.process(upper, out=tmp_path / "missing" / "o.parquet", progress=False)
    with pytest.raises(ColumnError, match="did you mean 'text'"):
        lf.batch.process(upper, "txt", out=tmp_path / "o.parquet", progress=False)
    with pytest.raises(ConfigError, match="chunk_rows must be an integer > 0"):
        lf.batch.process(upper, out=tmp_path / "o.parquet", chunk_rows=0, progress=False)
    with pytest.raises(ConfigError, match="key only apply with checkpoint="):
        lf.batch.process(upper, out=tmp_path / "o.parquet", key="id", progress=False)
    with pytest.raises(ConfigError, match=r"chunk_rows=10 sets .* out="):  # (ignored before)
        lf.batch.process(upper, chunk_rows=10, progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_output_types_settle_after_an_all_null_chunk(tmp_path: Path) -> None:
    def fn(batch: pl.DataFrame) -> list[str | None]:
        return [None if i < 50 else f"v{i}" for i in batch["id"]]

    frame(150).lazy().batch.process(fn, out=tmp_path / "o.parquet", chunk_rows=50,
                                    progress=False)
    got = pl.read_parquet(tmp_path / "o.parquet")
    assert got.schema["output"] == pl.String
    assert got["output"].to_list() == [None] * 50 + [f"v{i}" for i in range(50, 150)]


@pytest.mark.slow
def test_two_million_rows_noop(tmp_path: Path) -> None:
    n = 2_000_000
    src = tmp_path / "big.parquet"
    pl.select(id=pl.int_range(n), text=pl.format("document {} with some words", pl.int_range(n))
              ).write_parquet(src, row_group_size=100_000)
    summary = pl.scan_parquet(src).batch.process(
        lambda b: b["id"], out=tmp_path / "o.parquet", progress=False, items_per_batch=1000)
    assert summary.select("rows", "rows_ok", "chunks").row(0) == (n, n, 20)
    got = pl.scan_parquet(tmp_path / "o.parquet")
    check = got.select(pl.len(), (pl.col("output") == pl.col("id")).all(),
                       (pl.col("id").diff().fill_null(1) == 1).all(),
                       pl.col("error").null_count()).collect().row(0)
    assert check == (n, True, True, n)


def test_stream_keeps_the_output_tokens_keyword_in_every_chunk(tmp_path: Path) -> None:
    def fn(batch: pl.DataFrame) -> pl.Series:
        return batch["text"]

    fn.dfbatch_output_tokens = 300  # type: ignore[attr-defined]
    events: list = []
    lf = pl.LazyFrame({"text": ["a b"] * 12})
    lf.batch.process(fn, out=tmp_path / "o.parquet", chunk_rows=4, items_per_batch=4,
                     output_tokens_per_row=7, request_overhead_tokens=0,
                     encoding=lambda ts: [len(t.split()) for t in ts],
                     on_event=events.append, progress=False)
    tokens = [e.tokens for e in events if type(e).__name__ == "BatchStarted"]
    assert tokens == [4 * 2 + 4 * 7] * 3  # every chunk charges 7 output tokens per row


@pytest.mark.parametrize("kind", ["int", "struct"])
def test_types_after_a_chunk_that_failed_entirely(tmp_path: Path, kind: str) -> None:
    def fn(batch: pl.DataFrame) -> list[Any]:
        if batch["id"][0] < 50:
            return [dfbatch.RowError("down")] * batch.height
        return [i * 2 if kind == "int" else {"x": i} for i in batch["id"]]

    summary = frame(150).lazy().batch.process(fn, out=tmp_path / "o.parquet", chunk_rows=50,
                                              progress=False)
    assert summary["rows_failed"][0] == 50
    got = pl.read_parquet(tmp_path / "o.parquet")
    want = pl.Int64 if kind == "int" else pl.Struct({"x": pl.Int64})
    assert got.schema["output"] == want
    values = [i * 2 if kind == "int" else {"x": i} for i in range(50, 150)]
    assert got["output"].to_list() == [None] * 50 + values


def test_a_live_view_of_a_stream_counts_batches_without_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dfbatch.display
    from dfbatch.execute import _recorder
    from tests.fakes import RecordingView

    view = RecordingView()
    shown = view.shown

    def refuse(*args: object, **kwargs: object) -> None:
        msg = "an event was built for the live view"
        raise AssertionError(msg)

    monkeypatch.setattr(dfbatch.display, "open_display", lambda progress, **kw: view)
    for name in ("BatchStarted", "BatchFinished", "BatchFailed"):
        monkeypatch.setattr(_recorder, name, refuse)
    summary = frame(200).lazy().batch.process(upper, out=tmp_path / "o.parquet", chunk_rows=40,
                                              progress="bar", agents=2, items_per_batch=4,
                                              hedge_after=None)  # (a hedge is one call more)
    assert summary["rows_ok"].item() == 200 and summary["chunks"].item() == 5
    s = shown[-1]
    assert (s.rows_done, s.rows_ok, s.in_flight, s.finished) == (200, 200, 0, True)
    assert s.calls == s.batches_done >= 50
