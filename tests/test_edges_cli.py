"""Trust at the edges (issue 15), the command line: stop / resume messages, --mode, errors that
name CLI flags, the simulator's usage line, the demo's Ctrl-C report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

import dfbatch
from dfbatch.cli import main
from tests.test_cli import BIN, work  # noqa: F401  (fixture)


def test_run_without_a_key_names_the_cli_flags(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(work)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    r = CliRunner().invoke(main, ["run", "data.csv", "--text", "doc", "--model", "gpt-4o-mini",
                                  "--out", "o.parquet", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert "--base-url URL" in r.output and "OPENAI_API_KEY" in r.output
    assert "api_key=" not in r.output and "client=" not in r.output


def test_run_mode_batch_sends_one_request_per_batch(
    work: Path, monkeypatch: pytest.MonkeyPatch, make_sim: Any,  # noqa: F811
) -> None:
    monkeypatch.chdir(work)
    server = make_sim()
    r = CliRunner().invoke(main, ["run", "data.csv", "--text", "doc", "--model", "sim-chat",
                                  "--mode", "batch", "--items-per-batch", "4", "--base-url",
                                  server.url, "--out", "o.parquet", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert server.stats.snapshot().requests == 10  # 40 rows, 4 per request
    assert pl.read_parquet(work / "o.parquet")["error"].null_count() == 40


def test_plan_with_model_prices_what_run_sends(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, ["plan", "data.csv", "--text", "doc", "--agents", "1"])
    assert "no price; pass price_in_per_1k=" in r.output
    r = CliRunner().invoke(main, ["plan", "data.csv", "--text", "doc", "--agents", "1",
                                  "--model", "gpt-4o-mini", "--prompt", "Summarize: {doc}",
                                  "--max-tokens", "50"])
    assert r.exit_code == 0, r.output
    assert "up to 2,000 output tokens (fn's prompt, system message and max_tokens)" in r.output
    assert "est. cost: up to $" in r.output


def test_omitting_text_names_the_text_argument() -> None:
    df = pl.DataFrame({"id": [1], "doc": ["a"]})
    with pytest.raises(dfbatch.ColumnError, match=r"Pass text= .* e\.g\. text='doc'"):
        dfbatch.process(df, lambda b: b["doc"], progress=False)


def test_demo_ctrl_c_exits_130_and_does_not_count_cancelled_rows_as_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    import dfbatch.demo as demo

    report = demo.DemoReport(
        endpoint="http://x", model="sim-chat", rows=100, rows_ok=40, rows_failed=0,
        input_tokens=1, output_tokens=1, calls=10, retries=0, rate_limited=0, elapsed_s=4.0,
        result_path=tmp_path / "r.parquet", timeline_path=None, rows_cancelled=60,
    )
    assert report.rows_per_s == pytest.approx(10.0)  # 40 rows done in 4 s, not 100 / 4
    assert "rows ok 40 / failed 0 / cancelled 60 (stopped)" in str(report)
    monkeypatch.setattr(demo, "run_demo", lambda **_: report)
    r = CliRunner().invoke(main, ["demo", "--no-progress"])
    assert r.exit_code == 130, r.output
    assert "stopped by Ctrl-C: 40 of 100 rows done, 60 cancelled" in r.output
    assert "next: open the notebooks with `.venv/bin/jupyter lab" in r.output


def test_demo_counts_cancelled_rows_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import dfbatch.demo as demo

    def fake_process(df: pl.DataFrame, fn: Any, text: str, **kwargs: Any) -> pl.DataFrame:
        errors = ["cancelled" if i % 2 else None for i in range(df.height)]
        errors[0] = "boom"
        return df.with_columns(output=pl.lit("x"), error=pl.Series(errors, dtype=pl.String),
                               run_batch_id=pl.lit(0, pl.UInt32))

    monkeypatch.setattr(dfbatch, "process", fake_process)
    monkeypatch.setattr(demo, "_timeline", lambda result, path: None)
    df = demo.load_dataset().head(10)
    report = demo._enrich(df, "sim-chat", "http://127.0.0.1:9", tmp_path, False, limits={})
    assert (report.rows_ok, report.rows_failed, report.rows_cancelled) == (4, 1, 5)
    assert report.est_input_tokens > 0 and report.est_output_tokens == 10 * (160 + 12) + 3 * 16


@pytest.mark.slow
def test_ctrl_c_says_what_is_done_and_the_command_that_resumes(work: Path) -> None:  # noqa: F811
    proc = subprocess.Popen(
        [str(BIN), "run", "data.parquet", "--text", "doc", "--fn", "fns:slow", "--out",
         "out.parquet", "--items-per-batch", "2", "--agents", "2", "--checkpoint", "ck"],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SLOW_MARK": str(work / "slow.mark")})
    deadline = time.monotonic() + 60
    while not (work / "slow.mark").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert ("stopped by Ctrl-C: 20 of 40 rows done, 20 not done "
            "(error 'cancelled' in out.parquet)") in err
    assert "resume (the 20 done rows are not sent again):" in err
    command = err.split("resume (the 20 done rows are not sent again):\n", 1)[1].splitlines()[0]
    assert command.strip() == ("dfbatch run data.parquet --text doc --items-per-batch 2 --agents 2 "
                               "--fn fns:slow --out out.parquet --checkpoint ck")
    assert "400 of 400 rows written" not in err


@pytest.mark.slow
def test_sim_prints_how_to_use_its_url() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "dfbatch", "sim", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        url = first.split(" at ", 1)[1].split(" ", 1)[0]
        usage = proc.stderr.readline()
        assert f"base_url='{url}'" in usage and f"OPENAI_BASE_URL={url}" in usage
        assert f"--base-url {url}" in usage
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_ctrl_c_during_the_demo_exits_130_and_reports_cancelled_rows_apart(
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PYTHONPATH")}
    out_dir = tmp_path / "demo_out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfbatch", "demo", "--no-progress", "--rows", "3000",
         "--out-dir", str(out_dir)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not out_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(8.0)  # the simulator is up and the run is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    if "dfbatch demo:" in out:  # stopped mid-run: the report
        assert "failed 0 / cancelled" in out, out
        assert "stopped by Ctrl-C:" in err and "cancelled" in err
        rate = float(out.split(" rows/s")[0].rsplit(", ", 1)[1].replace(",", ""))
        done = 3000 - int(out.split("cancelled ")[1].split(" ")[0].replace(",", ""))
        elapsed = float(out.split("elapsed ")[1].split(" s")[0])
        assert rate == pytest.approx(done / elapsed, rel=0.05)
    else:  # stopped before the run started
        assert "stopped by Ctrl-C; no result was written" in err
    assert "Traceback" not in err
