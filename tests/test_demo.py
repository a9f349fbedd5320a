"""``python -m dfbatch demo`` and ``dfbatch sim`` end to end, in subprocesses (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PYTHONPATH")
    }
    return {**env, **extra}


@pytest.mark.slow
def test_demo_end_to_end_on_the_local_simulator(tmp_path):
    out_dir = tmp_path / "demo_out"
    proc = subprocess.run(
        [sys.executable, "-m", "dfbatch", "demo", "--no-progress", "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=_env(DFBATCH_DEMO_ROWS="24"),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows ok 24 / failed 0" in proc.stdout
    assert "simulator (not a real model)" in proc.stdout
    result = pl.read_parquet(out_dir / "result.parquet")
    assert result.height == 24 and result["error"].null_count() == 24
    assert result.schema["output"] == pl.Struct(
        {"summary": pl.String, "keywords": pl.List(pl.String)}
    )
    first = result.row(0, named=True)
    assert " ".join(first["doc"].split()[:3]) in first["output"]["summary"]  # extractive
    png = (out_dir / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


@pytest.mark.slow
def test_demo_switches_to_the_endpoint_in_the_environment(tmp_path, make_sim):
    server = make_sim(api_key="sk-demo-env-key")
    env = _env(OPENAI_BASE_URL=server.url, OPENAI_API_KEY="sk-demo-env-key")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfbatch",
            "demo",
            "--no-progress",
            "--rows",
            "8",
            "--model",
            "sim-chat",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"8 rows through sim-chat at {server.url}" in proc.stdout
    assert "simulator (not a real model)" not in proc.stdout  # it did not start its own
    snap = server.stats.snapshot()
    assert snap.by_status == {200: 2}  # 8 rows in batch mode: 2 requests, key accepted
    assert "sk-demo-env-key" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_sim_command_serves_until_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfbatch", "sim", "--port", "0", "--rpm", "100"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "dfbatch simulator at http://127.0.0.1:" in line
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(url + "/models", timeout=30) as r:
            assert json.load(r)["data"][0]["id"] == "sim-chat"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "served 0 requests" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
