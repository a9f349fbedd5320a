"""A blocking ``process()`` in a Jupyter kernel against the same run in a script.

Run: ``.venv/bin/python benchmarks/kernel_bench.py`` (~2 min on 2 cores). Options: ``--rows``,
``--items``, ``--rounds``, ``--fn noop|cpu``.

The same code runs in a long-lived ``python`` process (the script) and in a ``python3`` kernel
driven by nbclient (one blocking cell a run: ``dfbatch.process(...)``, ``progress=False``):

- ``noop``: ``async def fn(batch)`` that yields once (the pool's own cost dominates);
- ``cpu``: a plain ``def fn(batch)`` that does ~20 µs of Python work per row (a sync fn runs in
  worker threads).

Both are started and warmed up once (imports, planning, one run not counted), then run in
turns, one run each per round, the order swapped every round (script, kernel; kernel, script;
...), so that a burst of load from other processes on a shared machine falls on both sides
alike. Each run also times bare ``asyncio.gather`` + ``Semaphore`` over the same number of
no-op coroutines (in the kernel: on a loop in a worker thread, as dfbatch runs there).

Figures, in rows per wall second and per CPU second of the process (the kernel's own threads
count too; CPU seconds are steadier on a shared machine): the best of the rounds for each
side, the median, the ratio of the bests and the median of the per-round ratios (kernel
rows/s / script rows/s; the goal of issue 16: >= 0.95), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

SETUP = r'''
import asyncio, json, threading, time
import polars as pl, dfbatch

ROWS, ITEMS, KIND = {rows}, {items}, {kind!r}
ZEROS = {{n: [0] * n for n in range(1, 65)}}

async def noop(batch):
    await asyncio.sleep(0)
    return ZEROS[batch.height]

def cpu(batch):
    out = []
    for t in batch["text"]:
        x = 0
        for ch in t * 8:
            x = (x * 31 + ord(ch)) % 1000003
        out.append(x)
    return out

fn = noop if KIND == "noop" else cpu
df = pl.DataFrame({{"text": [f"row number {{i}}" for i in range(ROWS)]}})
planned = dfbatch.plan(df, encoding=lambda ts: [1] * len(ts), items_per_batch=ITEMS)
BATCHES = planned["batch_id"].n_unique()

async def bare(n, cap=32):
    sem = asyncio.Semaphore(cap)
    async def one():
        async with sem:
            await asyncio.sleep(0)
    await asyncio.gather(*(one() for _ in range(n)))

def bare_blocking(n):  # as dfbatch runs in a kernel: a fresh loop, in a thread if one runs
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bare(n))
    t = threading.Thread(target=asyncio.run, args=(bare(n),))
    t.start()
    t.join()

def timed(f):
    w, c = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - w, time.process_time() - c

def once():
    """One dfbatch run and one bare run: their wall and CPU seconds."""
    w, c = timed(lambda: dfbatch.process(planned, fn, progress=False))
    bw, bc = timed(lambda: bare_blocking(BATCHES))
    return {{"wall": w, "cpu": c, "bare_wall": bw, "bare_cpu": bc, "batches": BATCHES}}
'''
ONCE = 'print("RESULT", json.dumps(once()), flush=True)'
SERVE = "import sys\nfor _ in sys.stdin:\n    " + ONCE


class Script:
    """The script side: one ``python`` process that runs ``once()`` for each line it reads."""

    def __init__(self, setup: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", setup + SERVE], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return _result(line)
        msg = f"the script process ended (exit code {self.proc.wait()})"
        raise RuntimeError(msg)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Kernel:
    """The kernel side: a ``python3`` kernel; the setup cell runs once, then a cell a run."""

    def __init__(self, setup: str) -> None:
        import nbformat
        from nbclient import NotebookClient

        self.nb = nbformat.v4.new_notebook()
        self.nb.cells = [nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(ONCE)]
        self.client = NotebookClient(self.nb, timeout=900, kernel_name="python3")
        self.ctx = self.client.setup_kernel()
        self.ctx.__enter__()
        self.client.execute_cell(self.nb.cells[0], 0)

    def run(self) -> dict[str, float]:
        cell = self.client.execute_cell(self.nb.cells[1], 1)
        return _result("".join(o.get("text", "") for o in cell.outputs))

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)


def _result(text: str) -> dict[str, float]:
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])  # type: ignore[no-any-return]


def rounds(setup: str, n: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """``n`` rounds of one script run and one kernel run, the order swapped every round."""
    script, kernel = Script(setup), Kernel(setup)
    try:
        script.run()  # warm-up, not counted
        kernel.run()
        s_runs, k_runs = [], []
        for i in range(n):
            if i % 2 == 0:
                s_runs.append(script.run())
                k_runs.append(kernel.run())
            else:
                k_runs.append(kernel.run())
                s_runs.append(script.run())
        return s_runs, k_runs
    finally:
        script.close()
        kernel.close()


def report(rows: int, s_runs: list[dict[str, Any]], k_runs: list[dict[str, Any]]) -> None:
    print(f"{'':18} {'best rows/s':>12} {'median rows/s':>14} {'best bare rows/s':>17} "
          f"{'dfbatch/bare time':>18}")
    for unit, key in (("wall", "wall"), ("CPU", "cpu")):
        best = {}
        for name, runs in (("script", s_runs), ("kernel", k_runs)):
            rates = [rows / r[key] for r in runs]
            bare = [rows / r["bare_" + key] for r in runs]
            best[name] = max(rates)
            print(f"{name + ' (' + unit + ')':18} {max(rates):12,.0f} "
                  f"{statistics.median(rates):14,.0f} {max(bare):17,.0f} "
                  f"{max(bare) / max(rates):18.2f}")
        paired = [s[key] / k[key] for s, k in zip(s_runs, k_runs, strict=True)]
        ratio = best["kernel"] / best["script"]
        print(f"kernel / script rows/s ({unit}): best {ratio:.3f}, median of rounds "
              f"{statistics.median(paired):.3f} (rounds {min(paired):.3f}..{max(paired):.3f})"
              f"  goal >= 0.95: {'PASS' if ratio >= 0.95 else 'MISS'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fn", choices=("noop", "cpu"), default="noop")
    a = p.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    setup = f"import sys; sys.path.insert(0, {root!r})\n"
    setup += SETUP.format(rows=a.rows, items=a.items, kind=a.fn)
    before = os.getloadavg()
    s_runs, k_runs = rounds(setup, a.rounds)
    after = os.getloadavg()
    print(f"{a.rows:,} rows, fn={a.fn}, {int(s_runs[0]['batches']):,} batches of {a.items}, "
          f"{a.rounds} rounds (script and kernel in turns); load average "
          f"{before[0]:.2f} before, {after[0]:.2f} after ({os.cpu_count()} CPUs)")
    report(a.rows, s_runs, k_runs)


if __name__ == "__main__":
    main()
