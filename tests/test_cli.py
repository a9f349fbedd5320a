"""The ``dfbatch`` command line through its real entry points (``.venv/bin/dfbatch``, ``-m``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from dfbatch.cli import main

BIN = Path(sys.executable).with_name("dfbatch")
FNS = '''
import os, time
import dfbatch

def shout(batch):
    log = os.environ.get("CALLS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{batch.height}\\n")
    return [t.upper() for t in batch["doc"]]

def picky(batch):
    return [dfbatch.RowError("has a 7") if "7" in t else t.upper() for t in batch["doc"]]

def slow(batch):
    if batch["id"][0] >= 20:
        open(os.environ["SLOW_MARK"], "a").close()
    time.sleep(0.05 if batch["id"][0] < 20 else 30)
    return batch["doc"]

VALUE = 3
'''


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "fns.py").write_text(FNS)
    df = pl.DataFrame({"id": range(40), "doc": [f"document {i}" for i in range(40)]})
    df.write_parquet(tmp_path / "data.parquet")
    df.write_csv(tmp_path / "data.csv")
    df.write_ndjson(tmp_path / "data.ndjson")
    return tmp_path


def cli(
    cwd: Path, *args: str, module: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dfbatch"] if module else [str(BIN)]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=False)


@pytest.mark.slow
def test_plan_prints_the_summary(work: Path) -> None:
    r = cli(work, "plan", "data.parquet", "--text", "doc", "--agents", "2",
            "--items-per-batch", "8", "--output-tokens", "10", "--price-in", "0.5",
            "--price-out", "2")
    assert r.returncode == 0, r.stderr
    assert "plan: 40 rows in 5 batches over 2 agents" in r.stdout
    assert "est. cost: $" in r.stdout and "agent_id" in r.stdout  # cost line and per-agent table


@pytest.mark.slow
def test_run_writes_output_and_resumes_from_checkpoint(work: Path) -> None:
    args = ("run", "data.parquet", "--text", "doc", "--fn", "fns:shout", "--out", "out.parquet",
            "--checkpoint", "ck", "--items-per-batch", "4")
    r = cli(work, *args, CALLS_LOG=str(work / "calls.log"))
    assert r.returncode == 0, r.stderr
    assert "wrote 40 rows to out.parquet: 40 ok, 0 failed" in r.stderr
    out = pl.read_parquet(work / "out.parquet")
    assert out["output"].to_list() == [f"DOCUMENT {i}" for i in range(40)]
    assert out["error"].null_count() == 40
    calls = (work / "calls.log").read_text().split()
    assert sum(map(int, calls)) == 40
    r = cli(work, *args, module=True, CALLS_LOG=str(work / "calls.log"))  # python -m dfbatch
    assert r.returncode == 0, r.stderr
    assert (work / "calls.log").read_text().split() == calls  # all journaled: no new call


@pytest.mark.slow
def test_failed_rows_exit_3_and_still_write(work: Path) -> None:
    for src, dst in (("data.csv", "out.csv"), ("data.ndjson", "out.ndjson")):
        r = cli(work, "run", src, "--text", "doc", "--fn", "fns:picky", "--out", dst)
        assert r.returncode == 3, r.stderr
        assert "36 ok, 4 failed (see the error column)" in r.stderr
        out = pl.read_csv(work / dst) if dst.endswith("csv") else pl.read_ndjson(work / dst)
        failed = out.filter(pl.col("error").is_not_null())
        assert failed["id"].to_list() == [7, 17, 27, 37]
        assert (failed["error"] == "RowError: has a 7").all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data.parqet", "--fn", "fns:shout"), "'data.parqet' not found. Hint: did you mean "
                                               "'data.parquet'?"),
        (("data.parquet", "--text", "dco", "--fn", "fns:shout"),
         "--text 'dco': no such column. Hint: did you mean 'doc'?"),
        (("data.parquet", "--fn", "fnz:shout"), "module 'fnz' not found"),
        (("data.parquet", "--fn", "fns:shuot"), "has no attribute 'shuot'. Hint: did you mean "
                                                "'shout'?"),
        (("data.parquet", "--fn", "fns:VALUE"), "'fns:VALUE' is a int, not a function"),
        (("data.parquet", "--fn", "shout"), "expected module:function"),
        (("data.parquet",), "pass --fn module:function, or --model NAME"),
    ],
)
def test_usage_errors_exit_2_with_a_hint(work: Path, args: tuple[str, ...], message: str) -> None:
    base = ["run"] if "--text" in args else ["run", "--text", "doc"]
    r = cli(work, *base, *args, "--out", "out.parquet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split()), r.stderr
    assert not (work / "out.parquet").exists()


@pytest.mark.slow
def test_ctrl_c_writes_partial_output_and_exits_130(work: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN), "run", "data.parquet", "--text", "doc", "--fn", "fns:slow", "--out",
         "out.parquet", "--items-per-batch", "2", "--agents", "2"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SLOW_MARK": str(work / "slow.mark")})
    deadline = time.monotonic() + 60
    while not (work / "slow.mark").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the run to reach the slow calls
    time.sleep(0.5)  # the quick batches finish, the slow ones hang
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10  # did not wait for the 30 s calls in fn's threads
    out = pl.read_parquet(work / "out.parquet")
    assert out.height == 40
    assert out.filter(pl.col("id") < 20)["error"].null_count() == 20
    assert (out.filter(pl.col("id") >= 20)["error"] == "cancelled").all()
    assert "20 cancelled" in err


@pytest.mark.slow
def test_model_uses_the_chat_adapter(work: Path) -> None:
    import dfbatch.sim

    with dfbatch.sim.serve(time_scale=0.01) as url:
        r = cli(work, "run", "data.ndjson", "--text", "doc", "--model", "sim-chat", "--prompt",
                "Summarize: {doc}", "--max-tokens", "16", "--out", "out.parquet",
                OPENAI_BASE_URL=url, OPENAI_API_KEY="sk-test")
    assert r.returncode == 0, r.stderr
    out = pl.read_parquet(work / "out.parquet")
    assert out.height == 40 and out["error"].null_count() == 40
    assert out["output"].str.len_chars().min() > 0  # type: ignore[operator]


# -- in-process (click's runner): quick checks of the same paths ---------------------------
def test_in_process_plan_and_errors(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    runner = CliRunner()
    r = runner.invoke(main, ["plan", "data.csv", "--text", "doc", "--agents", "1"])
    assert r.exit_code == 0, r.output
    assert "plan: 40 rows in 10 batches over 1 agents" in r.output
    r = runner.invoke(main, ["plan", "notes.txt", "--text", "doc"])
    assert r.exit_code == 2 and "'notes.txt' not found" in r.output
    (work / "notes.txt").write_text("x")
    r = runner.invoke(main, ["plan", "notes.txt", "--text", "doc"])
    assert r.exit_code == 2 and "cannot read 'notes.txt': use one of .csv" in r.output
    r = runner.invoke(main, ["run", "data.csv", "--fn", "fns:shout", "--model", "m", "--out",
                             "o.parquet", "--text", "doc"])
    assert r.exit_code == 2 and "either --fn or --model" in r.output
    r = runner.invoke(main, ["run", "data.csv", "--fn", "fns:shout", "--out", "o.xlsx",
                             "--text", "doc"])
    assert r.exit_code == 2 and "use a .parquet, .csv or .ndjson file" in r.output
    r = runner.invoke(main, ["run", "data.csv", "--fn", "fns:shout", "--out", "o.parquet",
                             "--text", "doc", "--key", "idd", "--checkpoint", "ck"])
    assert r.exit_code == 2 and "--key 'idd': no such column. Hint: did you mean 'id'?" in r.output


def test_out_equal_to_the_input_is_refused(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    before = (work / "data.parquet").read_bytes()
    for out in ("data.parquet", "./data.parquet", str(work / "data.parquet")):
        r = CliRunner().invoke(main, ["run", "data.parquet", "--fn", "fns:shout", "--out", out,
                                      "--text", "doc", "--no-progress"])
        assert r.exit_code == 2 and "is the input file" in r.output, r.output
    assert (work / "data.parquet").read_bytes() == before
