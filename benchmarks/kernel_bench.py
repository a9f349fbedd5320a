"""A blocking ``process()`` in a Jupyter kernel against the same run in a script.

Run: ``.venv/bin/python benchmarks/kernel_bench.py`` (~1 min on 2 cores). Options: ``--rows``,
``--items``, ``--repeat``, ``--fn noop|cpu``.

The same code runs in a fresh ``python`` process (the script) and in a fresh ``python3``
kernel driven by nbclient, as one blocking cell (``dfbatch.process(...)``, ``progress=False``):

- ``noop``: ``async def fn(batch)`` that yields once (the pool's own cost dominates);
- ``cpu``: a plain ``def fn(batch)`` that does ~20 µs of Python work per row (a sync fn runs in
  worker threads).

Each side reports the best of ``--repeat`` runs in rows per wall second and per CPU second
of the process (steadier on a shared machine; the kernel's own threads count too), and bare
``asyncio.gather`` + ``Semaphore`` over the same number of no-op coroutines (in the kernel: on
a loop in a worker thread, as dfbatch runs). Ratio = kernel rows/s / script rows/s (the goal:
>= 0.95).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CODE = r'''
import asyncio, json, threading, time
import polars as pl, dfbatch

ROWS, ITEMS, REPEAT, KIND = {rows}, {items}, {repeat}, {kind!r}
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

def best(f, clock):
    times = []
    for _ in range(REPEAT):
        t0 = clock()
        f()
        times.append(clock() - t0)
    return min(times)

batches = planned["batch_id"].n_unique()
result = {{"batches": batches}}
for suffix, clock in (("", time.perf_counter), ("_cpu", time.process_time)):
    result["rows_s" + suffix] = ROWS / best(lambda: dfbatch.process(planned, fn, progress=False),
                                            clock)
    result["bare_rows_s" + suffix] = ROWS / best(lambda: bare_blocking(batches), clock)
print("RESULT", json.dumps(result))
'''


def in_script(code: str) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=900)
    return _result(res.stdout)


def in_kernel(code: str) -> dict[str, float]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code)]
    NotebookClient(nb, timeout=900, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    return _result(text)


def _result(text: str) -> dict[str, float]:
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--fn", choices=("noop", "cpu"), default="noop")
    a = p.parse_args(argv)
    code = CODE.format(rows=a.rows, items=a.items, repeat=a.repeat, kind=a.fn)
    root = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {root!r})\n" + code
    script = in_script(code)
    kernel = in_kernel(code)
    print(f"{a.rows} rows, fn={a.fn}, {int(script['batches'])} batches of {a.items}, "
          f"best of {a.repeat}; rows per wall second, and per CPU second of the process")
    print(f"{'':8} {'dfbatch rows/s':>15} {'bare rows/s':>12} {'dfbatch/bare time':>18}")
    for suffix in ("", "_cpu"):
        for name, r in (("script", script), ("kernel", kernel)):
            print(f"{name + suffix:12} {r['rows_s' + suffix]:11,.0f} "
                  f"{r['bare_rows_s' + suffix]:12,.0f} "
                  f"{r['bare_rows_s' + suffix] / r['rows_s' + suffix]:18.2f}")
        ratio = kernel["rows_s" + suffix] / script["rows_s" + suffix]
        print(f"kernel / script rows/s{suffix}: {ratio:.3f}")


if __name__ == "__main__":
    main()
