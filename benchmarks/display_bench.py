"""What the live dashboard costs: a no-op fn with progress=False versus the notebook widget.

Run: ``.venv/bin/python benchmarks/display_bench.py`` (~4 min on 2 cores). Options: ``--rows``
(default 100_000), ``--repeats`` (9, the order of the modes rotating each time), ``--no-kernel``
(skip the in-kernel measurement), ``--quick`` (~2 min: only the run's own cost of a listening
view, below).

A no-op async fn makes the event loop the bottleneck, so every millisecond the display takes
comes out of throughput: this is the worst case (with a real API the loop mostly waits).

Two settings:

script  in this process: ``progress="widget"`` builds the real ``WidgetDisplay`` (header,
        Stop button, Agg figure rendered to PNG by its child process) as inside a kernel, but
        widget messages go nowhere (no frontend). ``widget-thread`` is the same widget drawing
        its figure in a thread of this process instead (``draw="thread"``, the fallback when
        no child process can be started), to show what the child process saves. Also the
        tqdm bar (``progress="bar"``, to /dev/null).
        ``header`` (both settings) is the widget without its figure (``figure=False``): what
        the header's comm messages cost, apart from the figure.
kernel  inside a real ipykernel (nbclient), where every update is sent as comm messages.
        ``tqdm.notebook`` is what users write by hand instead: ``progress=False`` and a
        tqdm.notebook bar (an ipywidgets bar) fed by ``on_event``, the baseline for what any
        widget that moves during a run costs in a kernel.

Each line, medians over the repeats: ``call`` = wall time of ``process()`` (planning is done
beforehand; includes opening the display and its final frame), ``run`` = first batch start to
last batch end (what throughput is: rows/s), each with its ratio to ``progress=False`` in the
same setting (x1.000 = free, x0.950 = 5% slower), and the process CPU time of the call with its
ratio; ratios are medians of the ratios within each repeat, whose modes ran back to back
(for rows/s, the middle half of those ratios follows in brackets).
Below it, the display's own CPU time as a share of the run: its ``update`` / ``close`` calls on
the event loop, and the frames (drawn in the child process, or in the thread). The frame process
is kept between runs (``frames.KEEP_ALIVE_S``), so the first widget run of the session, which
starts it and imports matplotlib there, is shown on its own line. Single runs on this 2-core
machine vary by +-15%: read the medians, and rerun with more ``--repeats``.

``--quick`` (default 40,000 rows, 15 repeats): ``progress=False`` against a live view that does
nothing (``view``: what the run itself spends for a dashboard, counting each batch) and the tqdm
bar (to /dev/null), in CPU time of the loop's thread (the figure process, polars' threads and
the machine's other load left out): CPU per batch added (best against best) and the median of
the paired ratios, with their middle half.

Issue 16 (the run counts each batch into ``StatsAccumulator`` from its fields instead of
building and folding two events): ``--quick`` on the shared 2-core machine at load 4-5,
before: view +32.6 us a batch (x0.865 [0.849-0.867]), bar +26.1 us (x0.854); after: view +5.5
us (x0.968 [0.937-0.972]), bar +10.3 us (x0.962 [0.948-1.012]).
``benchmarks/listen_bench.py`` isolates the recorder's part: +18.7 -> +3.1 us a batch.
With the pool twice as fast (issue 16's lean call path) the same cost weighed more: view
x0.941, full bench script widget x0.937, kernel widget x0.946; after the recorder kept the calls
in flight itself (``events._live``: no tally call at a call's start) and answered calls were
folded when read: ``listen_bench`` +2.7 -> +1.8 us, full bench x0.962 / x0.948 (quiet machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH = """
import asyncio, json, statistics, sys, time, os
import polars as pl
import dfbatch, dfbatch.display as display

ROWS, REPEATS, IN_KERNEL = {rows}, {repeats}, {in_kernel}
frame = pl.DataFrame({{"text": [f"row {{i}}" for i in range(ROWS)]}}).batch.plan()

async def noop(batch):
    return [None] * batch.height

opened = []
loop_cpu = [0.0]  # CPU seconds the display's update / close took on the event loop thread
_open = display.open_display
def spy(progress, **kw):
    d = _open(progress, **kw)
    if d is None:
        return d
    def timed(method):
        def call(stats):
            t = time.thread_time()
            try:
                method(stats)
            finally:
                loop_cpu[0] += time.thread_time() - t
        return call
    d.update, d.close = timed(d.update), timed(d.close)
    opened.append(d)
    return d
display.open_display = spy
if not IN_KERNEL:  # build the notebook widget here, without a frontend to show it
    display.in_jupyter_kernel = lambda: True
    import IPython.display
    IPython.display.display = lambda *a, **k: None

modes = [False, "widget", "header"] + (["tqdm.notebook"] if IN_KERNEL else ["widget-thread", "bar"])
if IN_KERNEL:
    from tqdm.notebook import tqdm as notebook_bar
    from dfbatch.events import BatchFailed, BatchFinished

def hand_made_bar():
    # what users write without dfbatch's display: a tqdm.notebook bar fed by on_event
    bar = notebook_bar(total=ROWS)
    def on_event(ev):
        if isinstance(ev, BatchFinished) or (isinstance(ev, BatchFailed) and not ev.bisected):
            bar.update(ev.rows)
    return bar, on_event
import dfbatch.display.widget as W
_init = W.WidgetDisplay.__init__
VARIANTS = {{"widget-thread": {{"draw": "thread"}}, "header": {{"figure": False}}}}
def variant(mode):
    def init(self, *a, **k):
        _init(self, *a, **{{**k, **VARIANTS[mode]}})
    return init
times = {{str(m): [] for m in modes}}
spans = {{}}
cpu = {{}}
extra = {{}}
err = sys.stderr
for r in range(REPEATS):
    for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotate: no mode always first
        progress = mode
        if mode == "bar":
            sys.stderr = open(os.devnull, "w")
        if mode in VARIANTS:
            progress, W.WidgetDisplay.__init__ = "widget", variant(mode)
        loop_cpu[0] = 0.0
        t, c = time.perf_counter(), time.process_time()
        if mode == "tqdm.notebook":
            bar, on_event = hand_made_bar()
            out = frame.batch.process(noop, progress=False, on_event=on_event)
            bar.close()
        else:
            out = frame.batch.process(noop, progress=progress)
        dt = time.perf_counter() - t
        cpu.setdefault(str(mode), []).append(time.process_time() - c)
        sys.stderr, W.WidgetDisplay.__init__ = err, _init
        assert out.height == ROWS and out["error"].null_count() == ROWS
        end = out.select(pl.col("started_at") + pl.duration(seconds=pl.col("elapsed_s"))).max()
        span = (end.item() - out["started_at"].min()).total_seconds()
        times[str(mode)].append(dt)
        spans.setdefault(str(mode), []).append(span)
        if mode not in (False, "tqdm.notebook"):
            extra.setdefault(str(mode) + " loop", []).append(loop_cpu[0] / span)
        if mode in ("widget", "widget-thread"):
            w = opened[-1].inner
            extra.setdefault(mode + " frames", []).append(w.figure_draws)
            extra.setdefault(mode + " draw_share", []).append(w.figure_cpu_s / span)
print("RESULT", json.dumps({{"times": times, "spans": spans, "cpu": cpu, "extra": extra}}))
"""


def run_script(rows: int, repeats: int) -> dict[str, Any]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(BENCH.format(rows=rows, repeats=repeats, in_kernel=False), {"__name__": "bench"})
    return _result(buf.getvalue())


def run_kernel(rows: int, repeats: int) -> dict[str, Any]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    code = BENCH.format(rows=rows, repeats=repeats, in_kernel=True)
    nb.cells = [nbformat.v4.new_code_cell(code)]
    NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")
    return _result(text)


def _result(text: str) -> dict[str, Any]:
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def report(setting: str, res: dict[str, Any], rows: int) -> None:
    """Medians of the ratios within each repeat (modes of one repeat ran back to back)."""
    for mode, ts in res["times"].items():
        span = statistics.median(res["spans"][mode])
        line = (f"{setting:6s} {mode:13s} call {statistics.median(ts):6.2f} s "
                f"(x{ratio(res, 'times', mode):5.3f})  run {span:6.2f} s, "
                f"{rows / span:7,.0f} rows/s (x{ratio(res, 'spans', mode):5.3f}"
                f"{spread(ratios(res, 'spans', mode))})  process CPU "
                f"{statistics.median(res['cpu'][mode]):6.2f} s (x{ratio(res, 'cpu', mode):5.3f})")
        ex = res["extra"]
        if mode + " loop" in ex:
            line += f"\n{'':14s} display CPU: updates on the loop {pct(ex[mode + ' loop'])}"
        if mode.startswith("widget"):
            where = "figure thread" if mode == "widget-thread" else "figure process"
            line += (f", {where} {pct(ex[mode + ' draw_share'])} "
                     f"({statistics.median(ex[mode + ' frames']):.0f} frames)")
        if mode == "widget" and len(ts) > 1:
            first = res["spans"]["False"][0] / res["spans"][mode][0]
            line += (f"\n{'':14s} first run of the session (starts the frame process, imports "
                     f"matplotlib there): run x{first:5.3f}, figure process "
                     f"{100 * ex[mode + ' draw_share'][0]:.1f}% of the run")
        print(line)


def ratio(res: dict[str, Any], key: str, mode: str) -> float:
    return statistics.median(ratios(res, key, mode))


def ratios(res: dict[str, Any], key: str, mode: str) -> list[float]:
    return [b / x for b, x in zip(res[key]["False"], res[key][mode], strict=True)]


def spread(xs: list[float]) -> str:
    """The middle half of the per-repeat ratios (how far to trust the median)."""
    if len(xs) < 4:
        return ""
    q = statistics.quantiles(xs, n=4)
    return f" [{q[0]:.3f}-{q[2]:.3f}]"


def pct(xs: list[float]) -> str:
    return f"{100 * statistics.median(xs):.1f}% of the run"


def quick(rows: int, repeats: int) -> None:
    """The run's own cost of a listening view: loop-thread CPU, paired with progress=False."""
    import os

    import polars as pl

    import dfbatch.display as display

    frame = pl.DataFrame({"text": [f"row {i}" for i in range(rows)]}).batch.plan()

    async def noop(batch: pl.DataFrame) -> list[None]:
        return [None] * batch.height

    class View:  # a live view that draws nothing: what remains is the run's counting
        def update(self, stats: object) -> None: ...

        def close(self, stats: object) -> None: ...

    real = display.open_display
    display.open_display = lambda progress, **kw: (  # type: ignore[assignment]
        View() if progress == "view" else real(progress, **kw))
    modes: list[Any] = [False, "view", "bar"]
    cpu: dict[str, list[float]] = {str(m): [] for m in modes}
    err = sys.stderr
    try:
        for r in range(repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:
                if mode == "bar":
                    sys.stderr = open(os.devnull, "w")
                t = time.thread_time()
                frame.batch.process(noop, progress=mode)
                cpu[str(mode)].append(time.thread_time() - t)
                if mode == "bar":
                    sys.stderr.close()
                sys.stderr = err
    finally:
        sys.stderr, display.open_display = err, real
    batches = frame["batch_id"].n_unique()
    print(f"quick: {rows:,} rows, {batches:,} batches, {repeats} repeats, load average "
          f"{os.getloadavg()[0]:.1f}; loop-thread CPU")
    for mode in ("view", "bar"):
        added = (min(cpu[mode]) - min(cpu["False"])) / batches * 1e6
        rs = [b / x for b, x in zip(cpu["False"], cpu[mode], strict=True)]
        print(f"{mode:5s} {added:+5.1f} us a batch, x{statistics.median(rs):.3f}{spread(rs)} "
              f"of progress=False's rows/s")


def main() -> None:
    p = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or "").split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-kernel", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    t = time.perf_counter()
    if args.quick:
        rows = 40_000 if args.rows == 100_000 else args.rows  # the defaults: 40k rows, 15 times
        quick(rows, 15 if args.repeats == 9 else args.repeats)
        return
    report("script", run_script(args.rows, args.repeats), args.rows)
    if not args.no_kernel:
        report("kernel", run_kernel(args.rows, args.repeats), args.rows)
    print(f"({time.perf_counter() - t:.0f} s in all)")


if __name__ == "__main__":
    main()
