"""Peak memory of a large run against the data it holds: ``dfbatch.process`` over 1M rows.

Run: ``.venv/bin/python benchmarks/rss_bench.py`` (~1 min on 2 cores). Options: ``--rows``,
``--items``, ``--unplanned`` (run on the frame without its plan: planning counts too),
``--tracemalloc N`` (also print the N Python allocation sites that hold the most at the peak
of Python-object memory; slow).

The frame (``overhead_bench``'s: an ``id`` and a short ``text`` column, with the plan of
``--items`` rows a batch by a cheap tokenizer) is built here and written to a Parquet file. The
measurement runs in a fresh child process: it imports everything, runs a 1,000-row warm-up (so
lazily imported modules are not counted), reads the frame (so it holds the frame and nothing
left over from building it), gives freed heap back to the OS, and reads its resident set size
(RSS):

- ``rss_libs``: after the imports and the warm-up, before the frame (interpreter + libraries);
- ``rss_base``: after reading the frame: the baseline;
- ``peak``: the highest RSS while ``dfbatch.process(frame, noop, progress=False)`` runs
  (Linux ``VmHWM``, reset just before the run through ``/proc/self/clear_refs``; without that,
  ``getrusage(RUSAGE_SELF).ru_maxrss``, the peak of the whole process, can only be higher).

Sizes are Polars' ``estimated_size()``: ``input`` is the frame handed to ``process``;
``outputs`` is what the result adds to it (output column, ``error``, ``attempts``, run ids,
timing: ``result.estimated_size() - input``). Figures:

- ``run increase / (input + outputs)`` = ``(peak - rss_base) / (input + outputs)``: what the
  run itself needs on top of the frame it was given (goal of issue 16: <= 1.5);
- ``data peak / (input + outputs)`` = ``(peak - rss_libs) / (input + outputs)``: all the memory
  the data and the run hold at the peak, interpreter and libraries left out.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfbatch
from benchmarks.overhead_bench import cheap_tokens, noop


def frame(rows: int) -> pl.DataFrame:
    """``overhead_bench.frame``'s columns, built by Polars (no million Python strings)."""
    ids = pl.int_range(rows, dtype=pl.Int64)
    return pl.select(id=ids, text=pl.format("row {}", ids))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss() -> int:
    """Resident set size now, in bytes (``ru_maxrss`` where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else _maxrss()


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak() -> int:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _maxrss()


def settle() -> None:
    """Collect garbage and hand freed heap memory back to the OS, so RSS is what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def child(path: str, items: int, top: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"items_per_batch": items, "encoding": cheap_tokens, "progress": False}
    small = frame(1_000)
    dfbatch.process(dfbatch.plan(small, encoding=cheap_tokens, items_per_batch=items), noop,
                    **opts)
    del small
    settle()
    rss_libs = rss()
    df = pl.read_parquet(path)  # decoded into memory (an Arrow file could be mapped)
    settle()
    rss_base = rss()
    if top:
        import tracemalloc

        tracemalloc.start(8)
    exact = reset_peak()
    t0 = time.perf_counter()
    out = dfbatch.process(df, noop, **opts)
    wall = time.perf_counter() - t0
    high = peak()
    sites = ""
    if top:
        import tracemalloc

        _, py_peak = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = snap.statistics("lineno")[:top]
        sites = f"Python objects: peak {py_peak / 2**20:.1f} MiB traced; held now, top {top}:\n"
        sites += "\n".join(f"  {s.size / 2**20:8.1f} MiB {s.count:>9} objs  {s.traceback[0]}"
                           for s in stats)
    assert out.height == df.height and out["error"].is_null().all()
    size_in = df.estimated_size()
    return {
        "rows": df.height, "items": items, "planned": "batch_id" in df.columns,
        "exact_peak": exact,
        "rss_libs": rss_libs, "rss_base": rss_base, "peak": high, "input": size_in,
        "outputs": out.estimated_size() - size_in, "wall_s": wall, "sites": sites,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--unplanned", action="store_true", help="process() plans the frame too")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="N")
    p.add_argument("--child", metavar="PARQUET_FILE", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT", json.dumps(child(a.child, a.items, a.tracemalloc)))
        return
    df = frame(a.rows)
    if not a.unplanned:
        df = dfbatch.plan(df, encoding=cheap_tokens, items_per_batch=a.items)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "frame.parquet")
        df.write_parquet(path)
        del df
        cmd = [sys.executable, __file__, "--child", path, "--items", str(a.items),
               "--tracemalloc", str(a.tracemalloc)]
        load = os.getloadavg()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    mib = 2**20
    data = r["input"] + r["outputs"]
    print(f"{r['rows']:,} rows, {r['items']} items per batch, "
          f"{'planned' if r['planned'] else 'unplanned'} input, no-op async fn, "
          f"progress=False; {r['wall_s']:.1f} s; load average {load[0]:.2f} {load[1]:.2f}")
    print(f"input frame {r['input'] / mib:8.1f} MiB   outputs {r['outputs'] / mib:8.1f} MiB   "
          f"(estimated_size)")
    print(f"RSS: libraries {r['rss_libs'] / mib:.1f} MiB, with the frame (baseline) "
          f"{r['rss_base'] / mib:.1f} MiB, peak during the run {r['peak'] / mib:.1f} MiB"
          + ("" if r["exact_peak"] else " (ru_maxrss: peak of the whole process)"))
    inc = (r["peak"] - r["rss_base"]) / data
    print(f"run increase / (input + outputs) = {(r['peak'] - r['rss_base']) / mib:.1f} / "
          f"{data / mib:.1f} = {inc:.2f}  (goal <= 1.5: {'PASS' if inc <= 1.5 else 'MISS'})")
    print(f"data peak / (input + outputs)    = {(r['peak'] - r['rss_libs']) / mib:.1f} / "
          f"{data / mib:.1f} = {(r['peak'] - r['rss_libs']) / data:.2f}")
    if r["sites"]:
        print(r["sites"])


if __name__ == "__main__":
    main()
