"""The live notebook dashboard: header, Stop button and a matplotlib figure as a PNG.

Layout: a progress bar (rows done / total) with the Stop button, one line of key figures
(rows/s, tokens/s, ETA, in flight, retries, 429s, errors), and a figure with three panels:
per-agent load (planned, done, stolen and in-flight tokens), throughput over time, and the
retry / 429 / error timeline. The bar is blue while running, green when done, orange when
done with failed rows, red when stopped or failed. The widget stays in the output afterwards.

Rendering is cheap and never drives the run: the run calls ``update`` a few times per second
from its event loop; the header is re-rendered at most twice a second (each refresh is a comm
message, which the kernel's IOPub thread pays for); figure frames are drawn by a child process
(matplotlib's Agg, see ``frames`` and ``live_figure``), so the loop never stalls on a draw nor
waits for the interpreter lock, at most once per second, and less often when drawing is slow
(a token bucket keeps the drawing CPU time under ~2% of wall time). Finished frames are
published as PNG bytes into an ``ipywidgets.Image`` from the loop thread, in the cell's
context. No ``Output`` widget and no ``with out:`` is used, so updates work from the worker
thread of a blocking run too (ipykernel routes them by context, which the worker copies).

Stop button
-----------
The button calls ``stop`` (supplied by the run): nothing new starts, batches in flight end,
and the partial result is returned (unfinished rows get ``error='cancelled'``).

- ``await df.batch.aprocess(...)``: works. ipykernel >= 7 dispatches ``comm_msg`` while an
  async cell awaits (``Kernel.shell_main`` runs comm messages concurrently when the cell
  holds the shell lock), so the click reaches ``stop`` during the run. Checked with ipykernel
  7.4 (tests/test_display_kernel.py clicks it). ipykernel 6 handles shell messages one at a
  time, so there the click should wait until the cell ends (not tested); interrupt instead.
- ``df.batch.process(...)`` (blocking): works too. The run gets its own loop in a worker
  thread (``dfbatch.execute._loop``) while the cell's thread waits and pumps the kernel's
  widget messages (``dfbatch.execute._pump``: ipykernel 7 read directly, ipykernel 6 through
  jupyter-ui-poll), so the click reaches ``stop``, which the run hands to its own loop. With a
  kernel the pump does not know, the button is disabled: interrupt the kernel instead (the
  first interrupt stops the run gracefully and returns the partial result).

Examples
--------
>>> from dfbatch.events import RunStats
>>> from dfbatch.display.widget import WidgetDisplay
>>> w = WidgetDisplay(10, show=False, figure=False)
>>> w.update(RunStats(total_rows=10, rows_done=4, elapsed_s=2.0))
>>> w.bar.value, w.bar.description
(4, '40%')
>>> w.close(RunStats(total_rows=10, rows_done=10, rows_ok=10, elapsed_s=3.0, finished=True))
>>> w.bar.bar_style, w.button.disabled
('success', True)
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable
from typing import Any

from dfbatch.display import fmt_count, fmt_duration
from dfbatch.display.frames import Draw, FrameWorker, Png
from dfbatch.display.jobs import jobs_html
from dfbatch.display.style import COLORS
from dfbatch.events import RunStats

log = logging.getLogger("dfbatch.display")
_now = time.monotonic  # the throttle's clock (tests replace it)

_STOP_HELP = (
    "Stop cannot reach this blocking call from this kernel; "
    "interrupt the kernel instead (returns the partial result)."
)


class WidgetDisplay:
    """The ipywidgets dashboard of one run. ``show=False`` builds it without displaying it.

    Parameters
    ----------
    total_rows
        Rows of the run (the 100% mark).
    stop
        Called once when the Stop button is clicked; None disables the button.
    show
        Display the widget now (in the current cell's output).
    figure
        Draw the live figure (False: header only).
    min_figure_interval_s
        At least this many seconds between two figure frames.
    figure_budget
        Share of wall time the figure may take over the run (a token bucket on the CPU time
        of the frames: slow frames space out the next ones). The first frame, drawn once the run
        is ``first_figure_after_s`` old, imports matplotlib and lays out the figure; it is not
        counted.
    first_figure_after_s
        Runs shorter than this show no figure at all (no matplotlib import, no drawing):
        the header says everything about a run that short.
    header_interval_s
        At least this many seconds between two header refreshes while running. Each refresh
        is two comm messages (bar, key figures); inside a kernel every message costs the
        kernel's IOPub thread a few ms of CPU while a busy run holds the interpreter lock.
    draw
        ``"process"``: frames are drawn by a child process, so drawing never takes the
        interpreter lock from the run (see ``frames``); ``"thread"``: in a worker thread.
    """

    def __init__(
        self,
        total_rows: int,
        *,
        stop: Callable[[], None] | None = None,
        show: bool = True,
        figure: bool = True,
        min_figure_interval_s: float = 1.0,
        figure_budget: float = 0.02,
        first_figure_after_s: float = 1.0,
        draw: Draw = "process",
        header_interval_s: float = 0.5,
    ) -> None:
        try:
            import ipywidgets as w
        except ImportError as exc:  # pragma: no cover - ipywidgets is a core dependency
            msg = "progress='widget' needs ipywidgets; install it with `pip install ipywidgets`"
            raise ImportError(msg) from exc
        self.total_rows = total_rows
        self._stop = stop
        self._stopping = False
        self.bar = w.IntProgress(
            value=0, min=0, max=max(1, total_rows), description="0%", bar_style="info",
            style={"description_width": "initial"}, layout=w.Layout(width="auto", flex="1 1 auto"),
        )
        self.button = w.Button(
            description="Stop", icon="stop", disabled=stop is None,
            tooltip="Stop the run gracefully" if stop is not None else _STOP_HELP,
            layout=w.Layout(width="90px", flex="0 0 auto"),
        )
        self.button.on_click(self._on_stop)
        self.header = w.HTML(value=_header_html(RunStats(total_rows=total_rows), "starting"))
        self.jobs = w.HTML(value="", layout=w.Layout(display="none"))
        # one image per panel in a wrapping row: side by side when wide, stacked when narrow
        self.images = [w.Image(format="png", layout=w.Layout(
            max_width="100%", height="auto", flex="1 1 320px")) for _ in range(3)]
        self.image = w.Box(self.images, layout=w.Layout(
            display="none", flex_flow="row wrap", align_items="flex-start", width="100%"))
        self.box = w.VBox(
            [w.HBox([self.bar, self.button], layout=w.Layout(align_items="center")),
             self.header, self.jobs, self.image],
            layout=w.Layout(width="100%", max_width="1100px"),
        )
        self.renderer = FrameWorker(draw, panels=True) if figure else None
        self.budget = _Budget(figure_budget, min_figure_interval_s)
        self.first_figure_after_s = first_figure_after_s
        self.header_interval_s = header_interval_s
        self._header_at = float("-inf")
        self.figure_draws = 0
        self.figure_cpu_s = 0.0
        if show:
            from IPython.display import display

            display(self.box)

    def update(self, stats: RunStats) -> None:
        """Render a running snapshot: the header when due, a figure frame when the throttle
        allows."""
        now = _now()
        if now - self._header_at >= self.header_interval_s or self._stopping:
            self._header_at = now
            self._header(stats, "stopping" if self._stopping else "running")
        worker = self.renderer
        if worker is None:
            return
        self._publish(worker.take())
        due = stats.elapsed_s >= self.first_figure_after_s
        if due and worker.idle() and self.budget.ready():
            worker.submit(stats)
            self.budget.started()

    def close(self, stats: RunStats) -> None:
        """Render the final state (done / stopped / failed); the widget stays visible."""
        if stats.cancelled:
            state, style = "stopped", "danger"
        elif not stats.finished:
            state, style = "failed", "danger"
        elif stats.rows_failed:
            state, style = "done", "warning"
        else:
            state, style = "done", "success"
        self._header(stats, state)
        self.bar.bar_style = style
        self.button.disabled = True
        self.button.layout.display = "none"
        if self.renderer is not None:
            if self.renderer.started:  # a short run shows no figure: nothing to finish
                self._publish(self.renderer.finish(stats))
            self.renderer.close()
            self.renderer = None

    def _header(self, stats: RunStats, state: str) -> None:
        with self.bar.hold_sync():  # value and percentage in one message
            self.bar.max = max(1, stats.total_shown or self.bar.max)
            self.bar.value = min(stats.rows_shown, self.bar.max)
            self.bar.description = f"{stats.percent_done}%"
        self.header.value = _header_html(stats, state)
        if stats.jobs:  # a Batch API run: its jobs table (``display.jobs``)
            self.jobs.value = jobs_html(stats)
            self.jobs.layout.display = "block"

    def _publish(self, frame: tuple[Png, float] | None) -> None:
        if frame is None:
            return
        png, cpu_s = frame
        if self.figure_draws:  # the first frame (imports, layout, fonts) is setup, not upkeep
            self.budget.spend(cpu_s)
        self.figure_draws += 1
        self.figure_cpu_s += cpu_s
        pngs = (png,) if isinstance(png, bytes) else png
        for image, part in zip(self.images, pngs, strict=False):
            if image.layout.flex != (basis := f"1 1 {_png_width(part)}px"):
                image.layout.flex = basis  # natural width: the panels wrap below it
            image.value = part
        self.image.layout.display = "flex"

    def _on_stop(self, _button: Any) -> None:
        if self._stop is None or self._stopping:
            return
        self._stopping = True
        self.button.disabled = True
        self.button.description = "Stopping"
        self.button.icon = "hourglass-half"
        try:
            self._stop()
        except Exception:
            log.exception("dfbatch: the stop callback failed")


class _Budget:
    """Token bucket over time: a costly action may use ``share`` of wall time on average.

    >>> b = _Budget(share=0.1, min_interval_s=0.0, burst_s=0.2)
    >>> b.ready(now=0.0)
    True
    >>> b.spend(cost=0.5)  # a slow frame: 0.3 s in debt
    >>> b.ready(now=2.0), b.ready(now=3.5)  # 0.1 s repaid per second
    (False, True)
    """

    def __init__(self, share: float, min_interval_s: float, burst_s: float = 0.3) -> None:
        self.share = share
        self.min_interval_s = min_interval_s
        self.burst_s = burst_s
        self.balance = burst_s
        self.t: float | None = None
        self.last = float("-inf")

    def ready(self, now: float | None = None) -> bool:
        now = _now() if now is None else now
        if self.t is not None:
            self.balance = min(self.burst_s, self.balance + (now - self.t) * self.share)
        self.t = now
        return self.balance > 0 and now - self.last >= self.min_interval_s

    def started(self, now: float | None = None) -> None:
        self.last = _now() if now is None else now

    def spend(self, cost: float) -> None:
        self.balance -= cost


def _png_width(png: bytes) -> int:
    """The pixel width in a PNG's header (IHDR), 320 when it is not a PNG."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return 320
    return int.from_bytes(png[16:20], "big")


def _header_html(stats: RunStats, state: str) -> str:
    colour = {"done": COLORS["ok"], "stopped": COLORS["failed"], "failed": COLORS["failed"],
              "stopping": COLORS["retried"]}.get(state, COLORS["done"])
    if state == "done" and stats.rows_failed:
        colour = COLORS["retried"]
    eta = stats.eta_s
    flight = str(stats.in_flight)
    if stats.in_flight and stats.oldest_in_flight_s >= 1:
        flight += f" (oldest {fmt_duration(stats.oldest_in_flight_s)})"
    items = [
        (f"{stats.rows_shown:,} / {stats.total_shown:,}", "rows"),
        (fmt_count(stats.rows_per_s), "rows/s"),
        (fmt_count(stats.tokens_per_s), "tok/s"),
        (fmt_duration(stats.elapsed_s), "elapsed"),
        (fmt_duration(eta) if not stats.finished else "–", "ETA"),
        (flight, "in flight"),
        (str(stats.retries), "retries"),
        (str(stats.rate_limited), "429s"),
        (str(stats.errors), "errors"),
    ]
    if stats.rows_before:
        items.append((f"{stats.rows_before:,}", "done before (resumed)"))
    if stats.rows_cancelled:
        items.append((f"{stats.rows_cancelled:,}", "cancelled rows"))
    if stats.rows_failed:
        items.append((f"{stats.rows_failed:,}", "failed rows"))
    stolen = sum(a.stolen for a in stats.agents)
    if stolen:
        items.append((f"{stolen:,}", "stolen"))
    if stats.calls and not stats.jobs:
        items.append((f"{stats.p50_latency_s:.2f} / {stats.p95_latency_s:.2f} s", "p50 / p95"))
    if stats.saved_usd is not None:
        items.append((f"${stats.saved_usd:.4f}", "saved (Batch API)"))
    chips = "".join(
        f'<span style="white-space:nowrap"><b>{html.escape(v)}</b> '
        f'<span style="opacity:.7">{label}</span></span>'
        for v, label in items
    )
    badge = (
        f'<span style="background:{colour};color:white;border-radius:3px;padding:1px 7px;'
        f'font-weight:600">{state}</span>'
    )
    return (
        '<div style="display:flex;flex-wrap:wrap;gap:4px 16px;align-items:center;'
        f'font-size:13px;line-height:1.6;padding:2px 0 4px 2px">{badge}{chips}</div>'
    )
