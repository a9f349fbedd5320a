"""Checkpoint / resume: exactly-once rows, at most the in-flight batches repeated, clear errors."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest

import dfbatch
from dfbatch.config import BatchConfig
from dfbatch.errors import CheckpointError, CheckpointWarning, ConfigError, RowError
from dfbatch.persist._checkpoint import Journal
from dfbatch.persist._store import MAX_QUEUED

RUN_COLS = ("attempts", "run_batch_id", "run_agent_id", "started_at", "elapsed_s")
FAST = {"progress": False, "agents": 2, "items_per_batch": 4}


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": range(n), "text": [f"row {i} " + "w " * (i % 5) for i in range(n)]})


def expected(i: int, text: str) -> str:
    return f"out-{i}-{text[::-1]}"


class Crash(BaseException):
    """Stands in for a process crash: not an error value, it aborts the run."""


class Recorder:
    """A deterministic fn that records the ids of every call and can crash after ``crash_after``.

    Its attributes (``crash_after``, the lock) differ between the runs of a test, not its
    outputs: it declares its identity (``dfbatch_fingerprint``) so that resuming is allowed.
    """

    dfbatch_fingerprint: ClassVar[dict[str, str]] = {"fn": "Recorder"}

    def __init__(self, crash_after: int | None = None, fail: set[int] | None = None) -> None:
        self.calls: list[list[int]] = []
        self.crash_after = crash_after
        self.fail = fail or set()
        self.lock = threading.Lock()

    def __call__(self, batch: pl.DataFrame) -> list[object]:
        ids = batch["id"].to_list()
        with self.lock:
            if self.crash_after is not None and len(self.calls) >= self.crash_after:
                raise Crash
            self.calls.append(ids)
        return [RowError("bad row") if i in self.fail else expected(i, t)
                for i, t in zip(ids, batch["text"], strict=True)]

    @property
    def rows(self) -> list[int]:
        return [i for c in self.calls for i in c]


def strip(out: pl.DataFrame) -> pl.DataFrame:
    return out.drop(*RUN_COLS)


def test_crash_then_resume_calls_only_the_rest(tmp_path: Path) -> None:
    df = frame(60)
    first = Recorder(crash_after=6)
    with pytest.raises(Crash):
        dfbatch.process(df, first, checkpoint=tmp_path, max_in_flight=2, **FAST)
    assert len(first.calls) == 6
    done_before = set(first.rows)
    second = Recorder()
    out = dfbatch.process(df, second, checkpoint=tmp_path, max_in_flight=2, **FAST)
    assert not set(second.rows) & done_before  # journaled rows are not called again
    assert sorted(done_before | set(second.rows)) == list(range(60))
    clean = dfbatch.process(df, Recorder(), **FAST)
    assert strip(out).equals(strip(clean))
    assert out["output"].to_list() == [expected(i, t) for i, t in df.iter_rows()]
    # the parts were compacted into one; a third run makes no call at all
    assert len(list((tmp_path / "parts").glob("*.arrow"))) == 1
    third = Recorder()
    again = dfbatch.process(df, third, checkpoint=tmp_path, **FAST)
    assert third.calls == [] and strip(again).equals(strip(clean))


def test_other_run_is_a_clear_error_unless_overwrite(tmp_path: Path) -> None:
    df = frame(20)
    dfbatch.process(df, Recorder(), checkpoint=tmp_path, **FAST)

    def other(batch: pl.DataFrame) -> list[str]:
        return ["x"] * batch.height

    with pytest.raises(CheckpointError, match=r"fn: .*Recorder .*then, .*other now"):
        dfbatch.process(df, other, checkpoint=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match=r"input rows differ \(20 rows then, 21 now\)"):
        dfbatch.process(frame(21), Recorder(), checkpoint=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match=r"token_limit: 32768 then, 1000 now.*overwrite"):
        dfbatch.process(df, Recorder(), checkpoint=tmp_path, token_limit=1000, **FAST)
    fresh = Recorder()
    out = dfbatch.process(df, fresh, checkpoint=tmp_path, token_limit=1000, resume="overwrite",
                          **FAST)
    assert sorted(fresh.rows) == list(range(20)) and out["error"].null_count() == 20
    # batching and limits do not change outputs: they may change between runs
    later = Recorder()
    dfbatch.process(df, later, checkpoint=tmp_path, token_limit=1000, progress=False,
                    items_per_batch=7, agents=3, rpm=10_000)
    assert later.calls == []


def test_llm_fingerprint_attribute_is_part_of_the_identity(tmp_path: Path) -> None:
    df = frame(8)
    fn = Recorder()
    fn.dfbatch_fingerprint = {"model": "a", "prompt": "Summarize: {text}"}  # type: ignore[attr-defined]
    dfbatch.process(df, fn, checkpoint=tmp_path, **FAST)
    fn.dfbatch_fingerprint = {"model": "b", "prompt": "Summarize: {text}"}  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError, match="'model': 'b'"):
        dfbatch.process(df, fn, checkpoint=tmp_path, **FAST)
    part = functools.partial(lambda batch, suffix: [suffix] * batch.height, suffix="!")
    with pytest.raises(CheckpointError, match="keywords"):
        dfbatch.process(df, part, checkpoint=tmp_path, **FAST)


def test_error_rows_kept_unless_retry_errors(tmp_path: Path) -> None:
    df = frame(30)
    bad = {3, 17, 29}
    first = Recorder(fail=bad)
    out1 = dfbatch.process(df, first, checkpoint=tmp_path, **FAST)
    assert out1.filter(pl.col("error").is_not_null())["id"].to_list() == sorted(bad)
    again = Recorder()
    out2 = dfbatch.process(df, again, checkpoint=tmp_path, **FAST)
    assert again.calls == [] and strip(out2).equals(strip(out1))
    retry = Recorder()
    out3 = dfbatch.process(df, retry, checkpoint=tmp_path, retry_errors=True, **FAST)
    assert sorted(retry.rows) == sorted(bad)
    assert out3["error"].null_count() == 30
    assert out3["output"].to_list() == [expected(i, t) for i, t in df.iter_rows()]


def test_key_matches_rows_in_any_order(tmp_path: Path) -> None:
    df = frame(40)
    first = Recorder(crash_after=4)
    with pytest.raises(Crash):
        dfbatch.process(df, first, checkpoint=tmp_path, key="id", max_in_flight=1, **FAST)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=3)
    second = Recorder()
    out = dfbatch.process(shuffled, second, checkpoint=tmp_path, key="id", **FAST)
    assert not set(first.rows) & set(second.rows)
    assert sorted(first.rows + second.rows) == list(range(40))
    assert out["id"].to_list() == shuffled["id"].to_list()
    assert out["output"].to_list() == [expected(i, t) for i, t in shuffled.iter_rows()]


def test_bad_key_and_options_without_checkpoint(tmp_path: Path) -> None:
    df = frame(5)
    dup = pl.DataFrame({"id": [1, 1, 2], "text": ["a", "b", "c"]})
    with pytest.raises(ConfigError, match=r"duplicate values \(e.g. \[1, 1\]\)"):
        dfbatch.process(dup, Recorder(), checkpoint=tmp_path / "a", key="id", **FAST)
    with pytest.raises(ConfigError, match="did you mean 'id'"):
        dfbatch.process(df, Recorder(), checkpoint=tmp_path / "b", key="idd", **FAST)
    with pytest.raises(ConfigError, match="key, retry_errors only apply with checkpoint="):
        dfbatch.process(df, Recorder(), key="id", retry_errors=True, **FAST)
    with pytest.raises(ConfigError, match="resume must be 'auto' or 'overwrite'"):
        dfbatch.process(df, Recorder(), checkpoint=tmp_path / "c", resume="yes", **FAST)  # type: ignore[arg-type]


def test_damaged_part_and_stale_tmp_are_redone(tmp_path: Path) -> None:
    df = frame(24)
    first = Recorder(crash_after=4)
    with pytest.raises(Crash):
        dfbatch.process(df, first, checkpoint=tmp_path, max_in_flight=1, **FAST)
    parts = sorted((tmp_path / "parts").glob("*.arrow"))
    assert len(parts) == 1  # compacted when the crashed run ended
    stale = tmp_path / "parts" / f".{parts[0].stem[:32]}-00000099.arrow.tmp"
    stale.write_bytes(b"half a part")
    parts[0].write_bytes(parts[0].read_bytes()[:50])  # truncated, e.g. by a power loss
    second = Recorder()
    with pytest.warns(CheckpointWarning, match="damaged"):
        out = dfbatch.process(df, second, checkpoint=tmp_path, **FAST)
    assert sorted(second.rows) == list(range(24))  # its rows ran again
    assert out["output"].to_list() == [expected(i, t) for i, t in df.iter_rows()]
    assert not stale.exists()


def test_directory_guards(tmp_path: Path) -> None:
    df = frame(4)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is not a dfbatch checkpoint .*notes.txt"):
        dfbatch.process(df, Recorder(), checkpoint=tmp_path, **FAST)
    ck = tmp_path / "ck"
    cfg = BatchConfig(agents=2)
    planned = dfbatch.plan(df, config=cfg)
    holder = Journal.open(ck, planned, Recorder(), "text", cfg)
    dfbatch.process(df, Recorder(), checkpoint=ck, **FAST)  # opened, not running: no lock
    holder.acquire()  # as its run starts
    try:
        pid = os.getpid()
        with pytest.raises(CheckpointError, match=rf"in use by another run \(process {pid}"):
            dfbatch.process(df, Recorder(), checkpoint=ck, **FAST)
    finally:
        holder.close()
    dfbatch.process(df, Recorder(), checkpoint=ck, **FAST)  # released: usable again
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest .* is damaged"):
        dfbatch.process(df, Recorder(), checkpoint=ck, **FAST)


def test_several_output_columns_round_trip(tmp_path: Path) -> None:
    df = frame(12)
    calls: list[int] = []

    def fn(batch: pl.DataFrame) -> pl.DataFrame:
        calls.append(batch.height)
        return pl.DataFrame({"n": batch["id"] * 2, "tags": [[t, "x"] for t in batch["text"]],
                             "meta": [{"a": i, "b": str(i)} for i in batch["id"]]})

    out1 = dfbatch.process(df, fn, checkpoint=tmp_path, **FAST)
    n_calls = len(calls)
    out2 = dfbatch.process(df, fn, checkpoint=tmp_path, **FAST)
    assert len(calls) == n_calls
    assert strip(out2).equals(strip(out1))
    assert out2.schema["tags"] == pl.List(pl.String)
    assert out2["n"].to_list() == list(range(0, 24, 2))


# -- subprocess tests: SIGKILL and Ctrl-C --------------------------------------------------
SCRIPT = r'''
import asyncio, os, sys, time
import polars as pl, dfbatch, dfbatch.persist._store as ck

data, ckpt, calls_path, out, cap = sys.argv[1:6]
pause_at = int(os.environ.get("PAUSE_AT", "0"))
published = 0
publish = ck._publish

def slow_publish(tmp, final):  # a hook to be killed between writing a part and renaming it
    global published
    published += 1
    if published == pause_at:
        print("WRITING", tmp, flush=True)
        time.sleep(60)
    publish(tmp, final)

ck._publish = slow_publish
fd = os.open(calls_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def words(texts):
    return [len(t.split()) for t in texts]

async def fn(batch):
    ids = batch["id"].to_list()
    os.write(fd, (" ".join(map(str, ids)) + "\n").encode())
    await asyncio.sleep(float(os.environ.get("LATENCY", "0.004")) * (1 + ids[0] % 5))
    return [f"out-{i}-{t[::-1]}" for i, t in zip(ids, batch["text"])]

go = []
def on_event(ev):
    if not go:
        go.append(1)
        print("GO", flush=True)

df = pl.read_parquet(data)
res = dfbatch.process(df, fn, checkpoint=ckpt, progress=False, agents=2, items_per_batch=4,
                      max_in_flight=int(cap), encoding=words, on_event=on_event,
                      dynamic_batching=False)  # calls = planned batches + repeats
res.write_parquet(out)
print("DONE", res["error"].null_count(), flush=True)
'''


def _start(tmp_path: Path, cap: int, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    args = [sys.executable, str(script), str(tmp_path / "data.parquet"), str(tmp_path / "ck"),
            str(tmp_path / "calls.log"), str(tmp_path / "out.parquet"), str(cap)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _wait_for(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(word):
            return line
    _, err = proc.communicate()
    msg = f"no {word!r} line; stderr: {err}"
    raise AssertionError(msg)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reap it and close its pipes
    assert proc.returncode == -signal.SIGKILL


def _calls(tmp_path: Path) -> list[list[int]]:
    lines = (tmp_path / "calls.log").read_text().splitlines()
    return [[int(x) for x in line.split()] for line in lines if line.strip()]


def _check_final(tmp_path: Path, df: pl.DataFrame) -> pl.DataFrame:
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == df["id"].to_list()  # every key exactly once, in order
    clean = dfbatch.process(df, lambda b: [expected(*r) for r in b.select("id", "text").rows()],
                            progress=False, agents=2, items_per_batch=4, encoding=words)
    assert strip(out).equals(strip(clean))
    parts = list((tmp_path / "ck" / "parts").iterdir())
    assert len(parts) == 1 and parts[0].suffix == ".arrow"  # compacted, no tmp left
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    df = frame(2400)
    df.write_parquet(tmp_path / "data.parquet")
    rng = random.Random(7)
    cap, kills = 4, 0
    while kills < 10:
        proc = _start(tmp_path, cap)
        _wait_for(proc, "GO")
        time.sleep(rng.uniform(0.0, 0.25))
        _kill(proc)
        kills += 1
    assert not (tmp_path / "out.parquet").exists()  # never got to finish
    done_by_kills = len(_calls(tmp_path))
    proc = _start(tmp_path, cap)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    out = _check_final(tmp_path, df)
    calls = _calls(tmp_path)
    batches = out["batch_id"].n_unique()
    seen = Counter(i for c in calls for i in c)
    assert set(seen) == set(range(df.height))
    assert done_by_kills > 3 * cap  # the killed runs made progress
    # repeated calls: at most the in-flight ones and the parts queued for the writer thread
    assert len(calls) - batches <= kills * (cap + MAX_QUEUED)


@pytest.mark.slow
def test_kill_during_a_journal_write(tmp_path: Path) -> None:
    df = frame(200)
    df.write_parquet(tmp_path / "data.parquet")
    proc = _start(tmp_path, 1, PAUSE_AT="5")
    line = _wait_for(proc, "WRITING")
    tmp = Path(line.split(maxsplit=1)[1].strip())
    assert tmp.exists() and tmp.stat().st_size > 0 and tmp.name.startswith(".")
    _kill(proc)
    visible = list((tmp_path / "ck" / "parts").glob("*.arrow"))
    assert len(visible) == 4  # the fifth part was written but never published
    proc = _start(tmp_path, 1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _check_final(tmp_path, df)
    calls = _calls(tmp_path)
    # the stalled part and the parts queued behind it (the writer thread is stalled, the run
    # is not) ran twice: at most MAX_QUEUED + the stalled one + the one in flight
    repeats = len(calls) - df["id"].len() // 4
    assert 1 <= repeats <= MAX_QUEUED + 2
    assert not tmp.exists()


@pytest.mark.slow
def test_ctrl_c_then_resume_completes_the_rest(tmp_path: Path) -> None:
    df = frame(400)
    df.write_parquet(tmp_path / "data.parquet")
    proc = _start(tmp_path, 4, LATENCY="0.01")
    _wait_for(proc, "GO")
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    partial = pl.read_parquet(tmp_path / "out.parquet")
    ok_first = set(partial.filter(pl.col("error").is_null())["id"].to_list())
    cancelled = partial.filter(pl.col("error") == "cancelled")
    assert ok_first and cancelled.height and len(ok_first) + cancelled.height == 400
    n_first = len(_calls(tmp_path))
    proc = _start(tmp_path, 4, LATENCY="0.01")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    _check_final(tmp_path, df)
    resumed = {i for c in _calls(tmp_path)[n_first:] for i in c}
    assert not resumed & ok_first  # only the rest was called
    assert resumed == set(cancelled["id"].to_list())


@pytest.mark.parametrize("then, now", [(0.0, -0.0), (float("nan"), -float("nan"))])
def test_a_float_that_hashes_alike_is_another_input(tmp_path: Path, then: float,
                                                     now: float) -> None:
    """polars' ``hash_rows`` takes ``-0.0`` for ``0.0`` and every NaN for another: a rerun whose
    input changed between them must not resume with the old value's answers."""
    df = frame(6).with_columns(x=pl.Series([1.0, 2.0, then, 3.0, 4.0, 5.0]))
    dfbatch.process(df, Recorder(), checkpoint=tmp_path, **FAST)
    changed = df.with_columns(x=pl.Series([1.0, 2.0, now, 3.0, 4.0, 5.0]))
    with pytest.raises(CheckpointError, match=r"input rows differ \(6 rows then, 6 now\)"):
        dfbatch.process(changed, Recorder(), checkpoint=tmp_path, **FAST)
    again = Recorder()  # the same values: everything resumes
    dfbatch.process(df, again, checkpoint=tmp_path, **FAST)
    assert again.calls == []


def test_ordinary_float_rows_keep_their_hashes() -> None:
    """Only rows holding ``-0.0`` or an unusual NaN hash differently from ``hash_rows`` (the
    checkpoints of every other frame stay valid across the upgrade)."""
    from dfbatch.persist._fingerprint import _hash

    df = pl.DataFrame({"t": ["a", "b", "c", "d"], "x": [0.0, float("nan"), None, -0.0]})
    plain = df.hash_rows(seed=0x5EED).to_numpy()
    got = _hash(df)
    assert list(got[:3]) == list(plain[:3]) and got[3] != plain[3]
