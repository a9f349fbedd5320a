"""Integrity (issue 14): bad input fails before the first call, a paid answer is never lost."""

from __future__ import annotations

import asyncio
import functools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dfbatch
from dfbatch.config import BatchConfig, Columns
from dfbatch.errors import CheckpointError, CheckpointWarning, ConfigError
from dfbatch.events import RunStarted

QUIET = {"progress": False}


CALLED: list[int] = []  # rows per call of ``upper`` (a mutable global: not part of fn's identity)


def upper(batch: pl.DataFrame) -> pl.Series:
    CALLED.append(batch.height)
    return batch["text"].str.to_uppercase()


def called(since: int) -> int:
    return sum(CALLED[since:])


class CountingFn:
    """Counts the rows it was called with (to show that bad input made no call)."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, batch: pl.DataFrame) -> pl.Series:
        self.rows += batch.height
        return batch["text"].str.to_uppercase()


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timeout", "rpm", "tpm", "backoff_max", "backoff_base",
                                  "target_latency_s", "rate_burst", "hedge_after"])
def test_nan_settings_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        BatchConfig(**{name: math.nan})


def test_infinite_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        BatchConfig(timeout=math.inf)


def test_numpy_numbers_are_accepted_as_python_numbers() -> None:
    cfg = BatchConfig(items_per_batch=np.int64(4), agents=np.int32(2), timeout=np.float32(3))
    assert (cfg.items_per_batch, cfg.agents, cfg.timeout) == (4, 2, 3.0)
    assert type(cfg.items_per_batch) is int and type(cfg.timeout) is float
    out = dfbatch.process(pl.DataFrame({"text": ["a", "b"]}), upper,
                          items_per_batch=np.int64(1), **QUIET)
    assert out["output"].to_list() == ["A", "B"]


def test_columns_dict_is_converted_or_explained() -> None:
    out = dfbatch.process(pl.DataFrame({"text": ["a"]}), upper, columns={"output": "o"}, **QUIET)
    assert out["o"].to_list() == ["A"]
    assert BatchConfig(columns={"error": "err"}).columns == Columns(error="err")
    with pytest.raises(ConfigError, match=r"did you mean 'output'"):
        BatchConfig(columns={"outptu": "o"})
    with pytest.raises(ConfigError, match="Columns"):
        BatchConfig(columns=["output"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("typo", "hint"), [("progres", "progress"),
                                            ("checkpiont", "checkpoint"),
                                            ("retry_erors", "retry_errors")])
def test_process_keyword_typos_get_a_hint(typo: str, hint: str) -> None:
    fn = CountingFn()
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        dfbatch.process(pl.DataFrame({"text": ["a"]}), fn, **{typo: False})
    assert fn.rows == 0


# -- columns ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["output", "error", "attempts", "started_at", "run_batch_id",
                                  "run_agent_id", "elapsed_s"])
def test_result_column_clash_fails_before_the_first_call(name: str) -> None:
    fn = CountingFn()
    df = pl.DataFrame({"text": ["a", "b"], name: [1, 2]})
    with pytest.raises(dfbatch.ColumnError, match=rf"\['{name}'\].*columns=\{{'{name}'"):
        dfbatch.process(df, fn, **QUIET)
    assert fn.rows == 0
    renamed = {name: f"{name}_2"}
    out = dfbatch.process(df, fn, columns=renamed, **QUIET)
    assert out[name].to_list() == [1, 2] and f"{name}_2" in out.columns


def test_every_clash_is_named_at_once() -> None:
    df = pl.DataFrame({"text": ["a"], "output": [1], "error": ["x"], "elapsed_s": [1.0]})
    with pytest.raises(dfbatch.ColumnError, match=r"\['output', 'error', 'elapsed_s'\]"):
        dfbatch.process(df, upper, **QUIET)


def test_streaming_checks_clashes_before_reading(tmp_path: object) -> None:
    fn = CountingFn()
    lf = pl.LazyFrame({"text": ["a"], "attempts": [1]})
    with pytest.raises(dfbatch.ColumnError, match="attempts"):
        dfbatch.process(lf, fn, out=f"{tmp_path}/o.parquet", **QUIET)
    assert fn.rows == 0


# -- plan columns -----------------------------------------------------------------------------
def planned(n: int = 10) -> pl.DataFrame:
    return dfbatch.plan(pl.DataFrame({"text": [f"t{i}" for i in range(n)]}), agents=2)


@pytest.mark.parametrize(("damage", "match"), [
    (pl.lit(None, pl.UInt32).alias("batch_id"), "'batch_id' has 10 null"),
    (pl.col("batch_id").cast(pl.Int64) - 5, "'batch_id' has negative"),
    (pl.col("batch_id").cast(pl.Utf8), "'batch_id' has type String"),
    (pl.lit(-1).alias("agent_id"), "'agent_id' has negative"),
    (pl.lit(None, pl.Int64).alias("n_tokens"), "'n_tokens' has 10 null"),
    (pl.lit(60000, pl.UInt16).alias("agent_id"), "agent id 60000"),
])
def test_damaged_plan_columns_fail_before_the_first_call(damage: pl.Expr, match: str) -> None:
    fn = CountingFn()
    with pytest.raises(dfbatch.ColumnError, match=match):
        dfbatch.process(planned().with_columns(damage), fn, **QUIET)
    assert fn.rows == 0


def test_plan_from_more_agents_still_runs() -> None:
    df = dfbatch.plan(pl.DataFrame({"text": [f"t{i}" for i in range(40)]}), agents=8,
                      items_per_batch=2)
    assert df["agent_id"].max() == 7
    with pytest.warns(dfbatch.ReplanWarning, match="over 8 agents"):  # issue 15 item 3
        out = dfbatch.process(df, upper, agents=2, **QUIET)
    assert out["error"].null_count() == 40
    assert out["agent_id"].max() == 1
    out = dfbatch.process(df, upper, **QUIET)  # no plan settings: runs as planned
    assert out["error"].null_count() == 40 and out["agent_id"].max() == 7


def test_many_more_agents_than_batches_start_only_agents_with_work() -> None:
    started: list[RunStarted] = []
    df = pl.DataFrame({"text": [f"t{i}" for i in range(10)]})
    out = dfbatch.process(df, upper, agents=5000,
                          on_event=lambda e: started.append(e) if isinstance(e, RunStarted)
                          else None, **QUIET)
    assert out["error"].null_count() == 10
    assert len(started[0].planned_tokens) == out["batch_id"].n_unique()  # not 5000 idle agents


# -- the fingerprint: what fn is ----------------------------------------------------------------
def _ckpt_run(tmp_path: object, fn: object, **kw: object) -> pl.DataFrame:
    df = pl.DataFrame({"text": ["a", "b", "c"]})
    return dfbatch.process(df, fn, checkpoint=f"{tmp_path}/ck", **QUIET, **kw)  # type: ignore[arg-type]


def make_suffixer(suffix: str):  # type: ignore[no-untyped-def]
    def fn(batch: pl.DataFrame) -> list[str]:
        return [t + suffix for t in batch["text"]]
    return fn


def test_another_closure_of_the_same_name_is_refused(tmp_path: object) -> None:
    assert _ckpt_run(tmp_path, make_suffixer("!"))["output"].to_list() == ["a!", "b!", "c!"]
    assert _ckpt_run(tmp_path, make_suffixer("!"))["output"].to_list() == ["a!", "b!", "c!"]
    with pytest.raises(CheckpointError, match=r"fn .*make_suffixer.<locals>.fn: its code or the "
                                              "values it captured changed"):
        _ckpt_run(tmp_path, make_suffixer("?"))
    out = _ckpt_run(tmp_path, make_suffixer("?"), resume="overwrite")
    assert out["output"].to_list() == ["a?", "b?", "c?"]


def test_another_lambda_of_the_same_name_is_refused(tmp_path: object) -> None:
    _ckpt_run(tmp_path, lambda b: b["text"].str.to_uppercase())
    with pytest.raises(CheckpointError, match="its code"):
        _ckpt_run(tmp_path, lambda b: b["text"].str.to_lowercase())


def test_defaults_partials_and_callable_objects_are_part_of_the_identity(
    tmp_path: object,
) -> None:
    from dfbatch.persist._code import code_identity

    def fn(batch: pl.DataFrame, n: int = 1) -> list[int]:
        return [n] * batch.height

    def fn2(batch: pl.DataFrame, n: int = 2) -> list[int]:
        return [n] * batch.height

    assert code_identity(fn) != code_identity(fn2)
    assert code_identity(functools.partial(fn, n=3)) != code_identity(functools.partial(fn, n=4))

    class Tagger:
        def __init__(self, tag: str) -> None:
            self.tag = tag
            self.calls: list[int] = []  # run state: not part of the identity

        def __call__(self, batch: pl.DataFrame) -> list[str]:
            self.calls.append(batch.height)
            return [self.tag] * batch.height

    one = Tagger("x")
    assert code_identity(one) == code_identity(Tagger("x"))
    assert code_identity(Tagger("x")) != code_identity(Tagger("y"))
    _ckpt_run(tmp_path, one)
    assert _ckpt_run(tmp_path, one)["output"].to_list() == ["x"] * 3  # same object: resumes
    assert one.calls == [3]
    with pytest.raises(CheckpointError, match="Tagger"):
        _ckpt_run(tmp_path, Tagger("y"))


PROMPT = "v1"


def uses_a_global(batch: pl.DataFrame) -> list[str]:
    return [PROMPT] * batch.height


def test_a_changed_global_constant_is_a_changed_fn() -> None:
    from dfbatch.persist._code import code_identity

    global PROMPT
    before = code_identity(uses_a_global)
    PROMPT = "v2"
    try:
        assert code_identity(uses_a_global) != before
    finally:
        PROMPT = "v1"
    assert code_identity(uses_a_global) == before


def test_unsure_identity_is_refused_with_the_fix(tmp_path: object) -> None:
    class Opaque:
        __slots__ = ()

    thing = Opaque()

    def fn(batch: pl.DataFrame) -> list[str]:
        return [repr(thing)[:1]] * batch.height

    with pytest.raises(CheckpointError, match=r"closure variable 'thing' holds a .*Opaque.*"
                                              r"dfbatch_fingerprint = \{'version': 1\}"):
        _ckpt_run(tmp_path, fn)
    fn.dfbatch_fingerprint = {"version": 1}  # type: ignore[attr-defined]
    assert _ckpt_run(tmp_path, fn)["error"].null_count() == 3
    fn.dfbatch_fingerprint = {"version": 2}  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError, match="'version': 2"):
        _ckpt_run(tmp_path, fn)


def test_llm_adapters_declare_their_identity() -> None:
    from dfbatch.llm import chat
    from dfbatch.persist._fingerprint import fn_identity

    a = fn_identity(chat("m", "Say {text}", base_url="http://localhost:1"))
    b = fn_identity(chat("m", "Say {text}", base_url="http://localhost:1"))
    c = fn_identity(chat("m", "Shout {text}", base_url="http://localhost:1"))
    assert "unsure" not in a and a == b and a != c


# -- checkpoint: objects, checksums, failing disks -----------------------------------------------
class Thing:
    def __init__(self, n: int) -> None:
        self.n = n


def test_python_objects_are_refused_at_the_first_batch(tmp_path: Path) -> None:
    calls: list[int] = []

    def fn(batch: pl.DataFrame) -> list[Thing]:
        calls.append(batch.height)
        return [Thing(len(t)) for t in batch["text"]]

    df = pl.DataFrame({"text": [f"t{i}" for i in range(40)]})
    with pytest.raises(CheckpointError, match=r"Python objects \(Thing\) in column 'output'"):
        dfbatch.process(df, fn, checkpoint=tmp_path / "ck", items_per_batch=1, agents=1,
                        max_concurrent_batches=1, **QUIET)
    assert len(calls) < 40  # stopped at the first batch, not after the run
    parts = list((tmp_path / "ck" / "parts").iterdir())
    assert parts == []  # no pointer bytes on disk
    out = dfbatch.process(df, fn, **QUIET)  # without a checkpoint, objects are fine
    assert out["output"].dtype == pl.Object


def _part_files(ck: Path) -> list[Path]:
    return sorted((ck / "parts").glob("*.arrow"))


def test_a_flipped_byte_in_a_part_is_detected_and_redone(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})
    clean = dfbatch.process(df, upper, checkpoint=tmp_path, **QUIET)
    [part] = _part_files(tmp_path)
    data = bytearray(part.read_bytes())
    pos = bytes(data).find(b"ROW 3")  # change a stored answer: "ROW 3" -> "ROW 4"
    data[pos + 4] = ord("4")
    part.write_bytes(bytes(data))
    mark = len(CALLED)
    with pytest.warns(CheckpointWarning, match="checksum does not match"):
        out = dfbatch.process(df, upper, checkpoint=tmp_path, **QUIET)
    assert called(mark) == 8
    assert out["output"].to_list() == clean["output"].to_list()


def test_a_damaged_manifest_is_a_checkpoint_error(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": ["a", "b"]})
    dfbatch.process(df, upper, checkpoint=tmp_path, **QUIET)
    manifest = tmp_path / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"n_rows": 2', '"n_rows": 3'))  # still valid JSON
    with pytest.raises(CheckpointError, match=r"damaged .*checksum.*overwrite"):
        dfbatch.process(df, upper, checkpoint=tmp_path, **QUIET)
    out = dfbatch.process(df, upper, checkpoint=tmp_path, resume="overwrite", **QUIET)
    assert out["output"].to_list() == ["A", "B"]


def test_journal_writes_off_the_event_loop_in_order(tmp_path: Path) -> None:
    import threading

    from dfbatch.persist import _store

    threads: list[str] = []
    seqs: list[int] = []
    publish = _store._publish

    def spy(tmp: Path, final: Path) -> None:
        threads.append(threading.current_thread().name)
        seqs.append(int(final.name.split("-")[1]))
        publish(tmp, final)

    df = pl.DataFrame({"text": [f"r{i}" for i in range(12)]})
    _store._publish = spy  # type: ignore[assignment]
    try:
        dfbatch.process(df, upper, checkpoint=tmp_path, items_per_batch=2, **QUIET)
    finally:
        _store._publish = publish  # type: ignore[assignment]
    assert threads and all(t.startswith("dfbatch-journal") for t in threads)
    assert seqs == sorted(seqs)


def test_checkpoint_directory_removed_mid_run_finishes_in_memory(tmp_path: Path) -> None:
    import shutil

    ck = tmp_path / "ck"
    seen: list[int] = []

    def fn(batch: pl.DataFrame) -> pl.Series:
        seen.append(batch.height)
        while len(seen) == 3 and ck.exists():  # (the writer thread may add a file meanwhile)
            shutil.rmtree(ck, ignore_errors=True)
        return batch["text"].str.to_uppercase()

    df = pl.DataFrame({"text": [f"r{i}" for i in range(20)]})
    with pytest.warns(CheckpointWarning, match=r"journaling stopped .*FileNotFoundError"):
        out = dfbatch.process(df, fn, checkpoint=ck, items_per_batch=2, agents=1,
                              max_concurrent_batches=1, **QUIET)
    assert out["output"].to_list() == [f"R{i}" for i in range(20)]
    assert out["error"].null_count() == 20


def test_disk_full_mid_run_finishes_in_memory_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    writes = [0]
    real = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:  # type: ignore[override]
        writes[0] += 1
        if writes[0] >= 3:
            real(self, data[:10])  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    df = pl.DataFrame({"text": [f"r{i}" for i in range(20)]})
    with pytest.warns(CheckpointWarning, match=r"journaling stopped .*No space left"):
        out = dfbatch.process(df, upper, checkpoint=tmp_path, items_per_batch=2, **QUIET)
    assert out["output"].to_list() == [f"R{i}" for i in range(20)]
    names = [p.name for p in (tmp_path / "parts").iterdir()]
    assert len(names) == 2 and not [n for n in names if n.endswith(".tmp")]
    monkeypatch.undo()
    mark = len(CALLED)  # the two journaled batches are kept: 16 rows run again
    again = dfbatch.process(df, upper, checkpoint=tmp_path, items_per_batch=2, **QUIET)
    assert called(mark) == 16 and again["output"].to_list() == out["output"].to_list()


def _pristine_checkpoint(root: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A checkpoint of several uncompacted parts (as after a hard crash), and the clean result."""
    from dfbatch.persist._store import Store

    df = pl.DataFrame({"id": range(12), "text": [f"row {i} " + "x" * (i % 4) for i in range(12)]})
    compact = Store.compact
    Store.compact = lambda self: None  # type: ignore[method-assign]
    try:
        clean = dfbatch.process(df, keyed, checkpoint=root, **STEADY)
    finally:
        Store.compact = compact  # type: ignore[method-assign]
    return df, clean


def keyed(batch: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame({"answer": [f"{i}:{t}" for i, t in zip(batch["id"], batch["text"],
                                                                strict=True)],
                         "n": batch["id"] * 7, "tags": [[t, "x"] for t in batch["text"]]})


STEADY = {"items_per_batch": 2, "agents": 2, "dynamic_batching": False, "steal": False, **QUIET}
_OUT_COLS = ["id", "text", "answer", "n", "tags", "error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_checkpoint_resumes_exactly_or_refuses(data: st.DataObject) -> None:
    import shutil
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ck"
        df, clean = _pristine_checkpoint(root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        assert len([p for p in files if p.suffix == ".arrow"]) >= 4
        for _ in range(data.draw(st.integers(1, 3))):
            victim = files[data.draw(st.integers(0, 1 << 16)) % len(files)]
            raw = bytearray(victim.read_bytes())
            how = data.draw(st.sampled_from(["flip", "truncate", "zero"]))
            at = data.draw(st.integers(0, 1 << 20)) % max(len(raw), 1)
            if not raw:
                continue
            if how == "flip":
                raw[at] ^= data.draw(st.integers(1, 255))
            elif how == "truncate":
                del raw[at:]
            else:
                raw[at:at + 8] = bytes(len(raw[at:at + 8]))
            victim.write_bytes(bytes(raw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                out = dfbatch.process(df, keyed, checkpoint=root, **STEADY)
            except CheckpointError:
                return  # refused, with the fix in the message: never a wrong value
        assert out["id"].to_list() == df["id"].to_list()  # every row exactly once, in order
        assert out.select(_OUT_COLS).equals(clean.select(_OUT_COLS))
        shutil.rmtree(root, ignore_errors=True)


# -- one output type per run ----------------------------------------------------------------------
def _by_first_id(values: dict[int, object]):  # type: ignore[no-untyped-def]
    """fn whose batch starting at row i returns ``values[i]`` for each of its rows."""
    async def fn(batch: pl.DataFrame) -> list[object]:
        first = batch["id"][0]
        return [values.get(first, values[0])] * batch.height
    return fn


ONE_AT_A_TIME = {"items_per_batch": 2, "agents": 1, "max_concurrent_batches": 1,
                 "dynamic_batching": False, **QUIET}


@pytest.mark.parametrize(("first", "later", "fits"), [
    ("text", ["a", "list"], False),
    ("text", 5, False),
    ("text", {"a": 1}, False),
    (1, 2.0, True),
    (1, 2.5, False),
    (1.5, 2, True),
    ({"a": 1}, {"a": 2, "b": 3}, False),
])
def test_output_type_is_decided_once(first: object, later: object, fits: bool) -> None:
    df = pl.DataFrame({"id": range(6), "text": ["x"] * 6})
    out = dfbatch.process(df, _by_first_id({0: first, 2: later, 4: first}), **ONE_AT_A_TIME)
    assert out.height == 6
    first_type = pl.Series([first]).dtype
    assert out["output"].dtype == first_type
    errors = out["error"].to_list()
    assert errors[:2] == [None, None] and errors[4:] == [None, None]
    if fits:
        assert errors[2:4] == [None, None]
        assert out["output"][2] == later
    else:
        assert all("does not fit the run's output type" in e for e in errors[2:4])
        assert out["output"][2:4].to_list() == [None, None]


def test_declared_output_dtype_wins() -> None:
    df = pl.DataFrame({"id": range(4), "text": ["x"] * 4})
    out = dfbatch.process(df, _by_first_id({0: 1, 2: 2.5}), output_dtype=pl.Float64,
                          **ONE_AT_A_TIME)
    assert out["output"].to_list() == [1.0, 1.0, 2.5, 2.5] and out["error"].null_count() == 4
    with pytest.raises(ConfigError, match="output_dtype must be a Polars type"):
        BatchConfig(output_dtype="int")


def test_stream_keeps_one_type_and_loses_nothing_silently(tmp_path: Path) -> None:
    df = pl.DataFrame({"id": range(40), "text": ["x"] * 40})

    def structs(batch: pl.DataFrame) -> list[dict[str, int]]:
        return [{"a": i} if i < 10 else {"a": i, "b": 1} for i in batch["id"]]

    path = tmp_path / "s.parquet"
    s = dfbatch.process(df.lazy(), structs, out=path, chunk_rows=10, **QUIET)
    got = pl.read_parquet(path)
    assert got.height == 40 and s["rows"].item() == 40
    assert got["error"][:10].null_count() == 10
    assert got["error"][10:].str.contains("does not fit").all()  # said, not silently dropped

    def numbers(batch: pl.DataFrame) -> list[float]:
        return [i if i < 10 else i + 0.5 if i % 2 else float(i) for i in batch["id"]]

    path = tmp_path / "n.parquet"
    dfbatch.process(df.lazy(), numbers, out=path, chunk_rows=10, **QUIET)
    got = pl.read_parquet(path)
    assert got.height == 40 and got["output"].dtype == pl.Int64
    ok = got.filter(pl.col("error").is_null())
    assert ok["id"].to_list() == [i for i in range(40) if i < 10 or i % 2 == 0]
    assert ok["output"].to_list() == ok["id"].to_list()


# -- an exception after paying keeps what was paid for ------------------------------------------
class Boom(BaseException):
    """fn aborting the run (not an error value)."""


def test_exception_after_calls_carries_the_partial_result(tmp_path: Path) -> None:
    done: list[int] = []
    budget = [1, 1, 1]  # fn writes it (pop): run state, not part of fn's identity

    def fn(batch: pl.DataFrame) -> pl.Series:
        if not budget:
            raise Boom
        budget.pop()
        done.extend(batch["id"].to_list())
        return batch["text"].str.to_uppercase()

    df = pl.DataFrame({"id": range(20), "text": [f"r{i}" for i in range(20)]})
    with pytest.raises(Boom) as info:
        dfbatch.process(df, fn, checkpoint=tmp_path, items_per_batch=1, agents=1,
                        max_concurrent_batches=1, **QUIET)
    partial = info.value.partial  # type: ignore[attr-defined]
    assert isinstance(partial, pl.DataFrame) and partial["id"].to_list() == list(range(20))
    ok = partial.filter(pl.col("error").is_null())
    assert sorted(ok["id"].to_list()) == sorted(done) and len(done) == 3
    assert ok["output"].to_list() == [f"R{i}" for i in ok["id"]]
    assert partial.filter(pl.col("error").is_not_null())["error"].str.contains(
        "not finished: the run raised Boom").all()
    assert any("exc.partial" in n for n in getattr(info.value, "__notes__", []))
    budget.extend([1] * 100)  # the checkpoint holds the paid rows: only the others are called
    out = dfbatch.process(df, fn, checkpoint=tmp_path, **QUIET)
    assert out["error"].null_count() == 20 and len(done) == 20


def test_a_bug_inside_the_run_keeps_the_paid_rows() -> None:
    finished: list[object] = []

    def on_event(ev: object) -> None:  # stands in for a bug in dfbatch's own code
        if type(ev).__name__ == "BatchFinished":
            finished.append(ev)
            if len(finished) == 4:
                msg = "a bug"
                raise RuntimeError(msg)

    df = pl.DataFrame({"text": [f"r{i}" for i in range(12)]})
    with pytest.raises(RuntimeError, match="a bug") as info:
        dfbatch.process(df, upper, items_per_batch=1, agents=1, max_concurrent_batches=1,
                        on_event=on_event, **QUIET)
    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial.height == 12 and partial["error"].null_count() == 4
    assert partial.filter(pl.col("error").is_null())["output"].str.starts_with("R").all()


# -- a blocking run inside the async fn of another run ------------------------------------------
async def _inner_fn(batch: pl.DataFrame) -> pl.Series:
    await asyncio.sleep(0)
    return batch["text"].str.to_uppercase()


async def _outer_fn(batch: pl.DataFrame) -> list[str]:
    await asyncio.sleep(0)
    inner = dfbatch.process(pl.DataFrame({"text": ["x", "y", "z"]}), _inner_fn,
                            items_per_batch=1, **QUIET)
    return [",".join(inner["output"])] * batch.height


def test_blocking_process_inside_an_async_fn_of_another_run() -> None:
    df = pl.DataFrame({"text": [str(i) for i in range(12)]})
    out = dfbatch.process(df, _outer_fn, items_per_batch=1, **QUIET)
    assert out["error"].null_count() == 12 and set(out["output"]) == {"X,Y,Z"}


def test_blocking_process_inside_an_async_fn_of_aprocess() -> None:
    # in a subprocess: the last step is a blocking run inside a running loop (as in Jupyter)
    script = """if True:
        import asyncio, polars as pl, dfbatch
        from dfbatch.execute._loop import _IN_RUN
        q = dict(progress=False)
        def upper(b):
            return b["text"].str.to_uppercase()
        async def outer(batch):
            await asyncio.sleep(0)
            inner = dfbatch.process(pl.DataFrame({"text": ["x", "y", "z"]}), upper,
                                    items_per_batch=1, **q)
            return [",".join(inner["output"])] * batch.height
        df = pl.DataFrame({"text": [str(i) for i in range(12)]})
        async def main():
            out = await dfbatch.aprocess(df, outer, items_per_batch=1, **q)
            assert not _IN_RUN.get()  # the mark does not outlive the run in the caller's task
            return out, dfbatch.process(df, upper, **q)
        out, after = asyncio.run(main())
        print(out["error"].null_count(), sorted(set(out["output"])), after["error"].null_count())
    """
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "12 ['X,Y,Z'] 12"
