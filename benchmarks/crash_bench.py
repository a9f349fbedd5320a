"""Crash/resume: SIGKILL a checkpointed run at random moments, then resume to the end.

A subprocess runs ``dfbatch.process(..., checkpoint=...)`` with a deterministic async fake fn
that appends the ids of every call to a file. It is killed with SIGKILL at a random moment after
its first batch starts, ``--kills`` times (20 by default), then run once more to completion.
Prints the progress made under each kill, the calls made in all, the repeated calls against the
bound (kills x in-flight cap), and checks the final output against a clean in-process run: every
key exactly once, equal apart from timing columns. The baseline, in the same run, is the same
job without a checkpoint (its wall time, vs the checkpointed one without kills).

    .venv/bin/python benchmarks/crash_bench.py [--kills 20] [--rows 4000] [--cap 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import polars as pl

import dfbatch

SCRIPT = r'''
import asyncio, os, sys, time
import polars as pl, dfbatch

data, ckpt, calls_path, out, cap = sys.argv[1:6]
fd = os.open(calls_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def words(texts):
    return [len(t.split()) for t in texts]

async def fn(batch):
    ids = batch["id"].to_list()
    os.write(fd, (" ".join(map(str, ids)) + "\n").encode())
    await asyncio.sleep(0.004 * (1 + ids[0] % 5))
    return [f"out-{i}-{t[::-1]}" for i, t in zip(ids, batch["text"])]

started = []
def on_event(ev):
    if not started:
        started.append(1)
        print("GO", flush=True)

df = pl.read_parquet(data)
t0 = time.perf_counter()
res = dfbatch.process(df, fn, checkpoint=ckpt or None, progress=False, agents=2,
                      items_per_batch=4, max_in_flight=int(cap), encoding=words,
                      dynamic_batching=False, on_event=on_event)  # calls = batches + repeats
res.write_parquet(out)
print("DONE", time.perf_counter() - t0, flush=True)
'''

RUN_COLS = ["attempts", "run_batch_id", "run_agent_id", "started_at", "elapsed_s"]


def words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def start(tmp: Path, ckpt: str, cap: int) -> subprocess.Popen[str]:
    script = tmp / "job.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp / "data.parquet"), ckpt, str(tmp / "calls.log"),
         str(tmp / "out.parquet"), str(cap)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(word):
            return line
    _, err = proc.communicate()
    msg = f"the job ended before printing {word!r}: {err}"
    raise RuntimeError(msg)


def calls(tmp: Path) -> list[list[int]]:
    path = tmp / "calls.log"
    if not path.exists():
        return []
    return [[int(x) for x in ln.split()] for ln in path.read_text().splitlines() if ln.strip()]


def timed_run(tmp: Path, ckpt: str, cap: int) -> float:
    proc = start(tmp, ckpt, cap)
    line = wait_line(proc, "DONE")
    proc.communicate()
    return float(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--cap", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    df = pl.DataFrame({"id": range(args.rows),
                       "text": [f"row {i} " + "w " * (i % 5) for i in range(args.rows)]})
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        df.write_parquet(tmp / "data.parquet")
        plain = timed_run(tmp, "", args.cap)
        ckpt_s = timed_run(tmp, str(tmp / "ck-timing"), args.cap)
        print(f"baseline: {args.rows:,} rows in {plain:.2f} s without a checkpoint, "
              f"{ckpt_s:.2f} s with one ({ckpt_s / plain:.2f}x)")
        (tmp / "calls.log").unlink()
        (tmp / "out.parquet").unlink()
        ck = str(tmp / "ck")
        progress = []
        t0 = time.perf_counter()
        for _ in range(args.kills):
            before = len(calls(tmp))
            proc = start(tmp, ck, args.cap)
            wait_line(proc, "GO")
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            progress.append(len(calls(tmp)) - before)
        proc = start(tmp, ck, args.cap)
        wait_line(proc, "DONE")
        proc.communicate()
        total_s = time.perf_counter() - t0
        out = pl.read_parquet(tmp / "out.parquet")
        clean = dfbatch.process(df, lambda b: [f"out-{i}-{t[::-1]}" for i, t in
                                               b.select("id", "text").rows()],
                                progress=False, agents=2, items_per_batch=4, encoding=words)
        all_calls = calls(tmp)
        batches = out["batch_id"].n_unique()
        repeated = len(all_calls) - batches
        per_row = Counter(i for c in all_calls for i in c)
        keys_once = out["id"].to_list() == df["id"].to_list()
        equal = out.drop(RUN_COLS).equals(clean.drop(RUN_COLS))
        print(f"kills: {args.kills}, calls made under each kill: {progress}")
        print(f"planned batches: {batches:,}; calls in all: {len(all_calls):,}; "
              f"repeated calls: {repeated} <= bound kills x cap = {args.kills * args.cap}: "
              f"{repeated <= args.kills * args.cap}")
        print(f"rows called twice or more: {sum(k > 1 for k in per_row.values())}; "
              f"rows never called: {args.rows - len(per_row)}")
        print(f"final output: every key exactly once, in order: {keys_once}; "
              f"equal to a clean run apart from timing columns: {equal}")
        print(f"parts left after the final run: {sorted(os.listdir(Path(ck) / 'parts'))}")
        print(f"wall time for {args.kills} killed runs + the final one: {total_s:.1f} s")
        if not (keys_once and equal and repeated <= args.kills * args.cap):
            sys.exit(1)


if __name__ == "__main__":
    main()
