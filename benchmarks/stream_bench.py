"""Peak memory of LazyFrame streaming (``out=``) for 1M vs 2M vs 4M rows, with a no-op fn.

Each size runs in its own subprocess and reports its peak RSS (``ru_maxrss``). The baseline, in
the same run, is the in-memory path (``pl.read_parquet`` + ``dfbatch.process``) on the same
files: streaming should stay flat while the baseline grows with the data.

    .venv/bin/python benchmarks/stream_bench.py [--sizes 1000000,2000000,4000000]
        [--chunk-rows 100000] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

CHILD = r'''
import json, resource, sys, time
import polars as pl, dfbatch

mode, src, out, chunk_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def noop(batch):
    return batch["id"]

t0 = time.perf_counter()
if mode == "stream":
    s = pl.scan_parquet(src).batch.process(noop, out=out, chunk_rows=chunk_rows,
                                           items_per_batch=1000, progress=False)
    rows = s["rows"].item()
else:
    res = pl.read_parquet(src).batch.process(noop, items_per_batch=1000, progress=False)
    res.write_parquet(out)
    rows = res.height
print(json.dumps({"rows": rows, "s": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make(path: Path, n: int) -> None:
    pl.select(
        id=pl.int_range(n),
        text=pl.format("document number {} with a few words of text", pl.int_range(n)),
    ).write_parquet(path, row_group_size=100_000)


def measure(mode: str, src: Path, out: Path, chunk_rows: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out),
                           str(chunk_rows)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"{mode} run failed:\n{proc.stderr}"
        raise RuntimeError(msg)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    check = pl.scan_parquet(out).select(pl.len(), (pl.col("output") == pl.col("id")).all())
    assert check.collect().row(0) == (data["rows"], True)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,2000000,4000000")
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"no-op fn, items_per_batch=1000, chunk_rows={args.chunk_rows:,}")
    print(f"{'rows':>10} {'stream RSS':>11} {'x first':>8} {'stream s':>9} "
          f"{'in-memory RSS':>14} {'x first':>8} {'in-mem s':>9}")
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            src = Path(tmp) / f"in-{n}.parquet"
            make(src, n)
            s = measure("stream", src, Path(tmp) / "out.parquet", args.chunk_rows)
            first.setdefault("stream", s["rss_mb"])
            line = (f"{n:>10,} {s['rss_mb']:>9.0f}MB {s['rss_mb'] / first['stream']:>8.2f} "
                    f"{s['s']:>9.1f}")
            if not args.no_baseline:
                b = measure("memory", src, Path(tmp) / "out.parquet", args.chunk_rows)
                first.setdefault("memory", b["rss_mb"])
                line += (f" {b['rss_mb']:>12.0f}MB {b['rss_mb'] / first['memory']:>8.2f} "
                         f"{b['s']:>9.1f}")
            print(line, flush=True)
            src.unlink()


if __name__ == "__main__":
    main()
