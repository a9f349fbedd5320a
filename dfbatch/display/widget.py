"""The live notebook dashboard: header, Stop button and a matplotlib figure as a PNG.

Layout: a progress bar (rows done / total) with the Stop button, one line of key figures
(rows/s, tokens/s, ETA, in flight, retries, 429s, errors), and a figure with three panels:
per-agent load (planned, done, stolen and in-flight tokens), throughput over time, and the
retry / 429 / error timeline. The bar is blue while running, green when done, orange when
done with failed rows, red when stopped or failed. The widget stays in the output afterwards.

Rendering is cheap and never drives the run: the header is re-rendered on every ``update``
(the run calls it a few times per second); the figure is redrawn with Agg into an
``ipywidgets.Image`` at most twice per second and less often when drawing is slow (its
drawing time is kept under ~3% of wall time). No ``Output`` widget and no ``with out:``
is used, so updates work under nested event loops (nest-asyncio2) too.

Stop button
-----------
The button calls ``stop`` (supplied by the run): nothing new starts, batches in flight end,
and the partial result is returned (unfinished rows get ``error='cancelled'``).

- ``await df.batch.aprocess(...)``: works. ipykernel >= 7 dispatches ``comm_msg`` while an
  async cell awaits (``Kernel.shell_main`` runs comm messages concurrently when the cell
  holds the shell lock), so the click reaches ``stop`` during the run. Checked with ipykernel
  7.4 (tests/test_display_kernel.py clicks it). On ipykernel 6 the click is queued until the
  cell ends, i.e. it has no effect; interrupt the kernel instead.
- ``df.batch.process(...)`` (blocking): cannot work, so the run passes ``stop=None`` and the
  button is disabled. The kernel does receive the click, but it handles shell messages in
  one shared ``contextvars.Context`` that the running cell has entered, and nest-asyncio2
  defers such handles until the nested loop exits, i.e. until the run is over. Interrupt
  the kernel (the stop button of the notebook, or Ctrl-C in a terminal) instead: the first
  interrupt stops the run gracefully and returns the partial result.

Examples
--------
>>> from dfbatch.events import RunStats
>>> from dfbatch.display.widget import WidgetDisplay
>>> w = WidgetDisplay(10, show=False)  # doctest: +SKIP
>>> w.update(RunStats(total_rows=10, rows_done=4, elapsed_s=2.0))  # doctest: +SKIP
>>> w.bar.value, w.bar.description  # doctest: +SKIP
(4, '40%')
"""

from __future__ import annotations

import html
import io
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from dfbatch.display import fmt_count, fmt_duration
from dfbatch.display.plots import COLORS, new_figure, si_formatter
from dfbatch.events import RunStats

log = logging.getLogger("dfbatch.display")
_now = time.monotonic  # the throttle's clock (tests replace it)

_STOP_HELP = (
    "Stop works under `await df.batch.aprocess(...)`. "
    "For a blocking call, interrupt the kernel (returns the partial result)."
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
        At least this many seconds between two figure redraws.
    figure_budget
        Share of wall time the figure may take over the run (a token bucket: slow draws
        space out the next ones).
    """

    def __init__(
        self,
        total_rows: int,
        *,
        stop: Callable[[], None] | None = None,
        show: bool = True,
        figure: bool = True,
        min_figure_interval_s: float = 0.5,
        figure_budget: float = 0.03,
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
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
        self.image.layout.display = "none"  # until the first figure
        self.box = w.VBox(
            [w.HBox([self.bar, self.button], layout=w.Layout(align_items="center")),
             self.header, self.image],
            layout=w.Layout(width="100%", max_width="1100px"),
        )
        self.live = _LiveFigure() if figure else None
        self.budget = _Budget(figure_budget, min_figure_interval_s)
        self.figure_draws = 0
        if show:
            from IPython.display import display

            display(self.box)

    def update(self, stats: RunStats) -> None:
        """Render a running snapshot: header always, figure when its throttle allows."""
        self._header(stats, "stopping" if self._stopping else "running")
        if self.live is not None and self.budget.ready():
            self._figure(stats)

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
        self._figure(stats, final=True)

    def _header(self, stats: RunStats, state: str) -> None:
        self.bar.value = min(stats.rows_done, self.bar.max)
        self.bar.description = f"{stats.fraction_done:.0%}"
        self.header.value = _header_html(stats, state)

    def _figure(self, stats: RunStats, *, final: bool = False) -> None:
        if self.live is None:
            return
        start = _now()
        try:
            png = self.live.render(stats, final=final)
        except Exception:
            log.exception("dfbatch: the live figure failed; showing the header only")
            self.live = None
            return
        self.budget.spend(start, _now() - start)
        self.figure_draws += 1
        self.image.value = png
        self.image.layout.display = None

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
    >>> b.spend(0.0, cost=0.5)  # a slow draw: 0.3 s in debt
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

    def spend(self, start: float, cost: float) -> None:
        self.balance -= cost
        self.last = start


def _header_html(stats: RunStats, state: str) -> str:
    colour = {"done": COLORS["ok"], "stopped": COLORS["failed"], "failed": COLORS["failed"],
              "stopping": COLORS["retried"]}.get(state, COLORS["done"])
    if state == "done" and stats.rows_failed:
        colour = COLORS["retried"]
    eta = stats.eta_s
    items = [
        (f"{stats.rows_done:,} / {stats.total_rows:,}", "rows"),
        (fmt_count(stats.rows_per_s), "rows/s"),
        (fmt_count(stats.tokens_per_s), "tok/s"),
        (fmt_duration(stats.elapsed_s), "elapsed"),
        (fmt_duration(eta) if not stats.finished else "–", "ETA"),
        (str(stats.in_flight), "in flight"),
        (str(stats.retries), "retries"),
        (str(stats.rate_limited), "429s"),
        (str(stats.errors), "errors"),
    ]
    if stats.rows_failed:
        items.append((f"{stats.rows_failed:,}", "failed rows"))
    stolen = sum(a.stolen for a in stats.agents)
    if stolen:
        items.append((f"{stolen:,}", "stolen"))
    if stats.calls:
        items.append((f"{stats.p50_latency_s:.2f} / {stats.p95_latency_s:.2f} s", "p50 / p95"))
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


class _Limits(NamedTuple):
    agents: int
    load_top: float
    t_end: float
    rate_top: float


class _LiveFigure:
    """Three panels drawn with Agg, returned as PNG bytes.

    Axes, ticks, labels and legends are drawn once and cached (blitting); an update restores
    that background and draws only the data artists. A full redraw happens only when the
    limits grow (time by 2x, y by 1.3-1.5x), the number of agents changes, or on the final frame.
    """

    def __init__(self, width: float = 11.0, height: float = 2.9, dpi: float = 96) -> None:
        self.fig = new_figure(width, height, dpi=dpi)
        self.limits: _Limits | None = None
        self.full_draws = 0
        self.background: Any = None
        self.dynamic: list[Any] = []  # artists redrawn on every update
        self.own_bars: Any = None
        self.stolen_bars: Any = None
        self.inflight_bars: Any = None
        self.rate_line: Any = None
        self.rate_fill: Any = None
        self.inc_points: dict[str, Any] = {}

    def render(self, stats: RunStats, *, final: bool = False) -> bytes:
        """PNG bytes of the figure for ``stats``; ``final`` fits the limits to the data."""
        from dfbatch.display.plots import _style

        t, rows, toks = _rates(stats.history)
        with _style():
            limits = self._limits(stats, rows, final=final)
            if limits != self.limits:
                self._build(stats, limits)
            else:
                self.fig.canvas.restore_region(self.background)  # type: ignore[attr-defined]
            self._update(stats, t, rows, toks)
        return self._png()

    def _limits(self, stats: RunStats, rows: Any, *, final: bool) -> _Limits:
        need_load = max((max(a.planned_tokens, a.done_tokens + max(0, a.inflight_tokens))
                         for a in stats.agents), default=0)
        need_t = stats.elapsed_s
        need_rate = float(rows.max()) if len(rows) else 0.0
        if final:
            return _Limits(len(stats.agents), max(1.0, need_load * 1.08), max(1.0, need_t),
                           max(1.0, need_rate * 1.1))
        old = self.limits
        if old is None or old.agents != len(stats.agents):
            old = _Limits(len(stats.agents), 0.0, 0.0, 0.0)
        return _Limits(
            old.agents,
            _grow(old.load_top, need_load, 1.3, 1.0),
            _grow(old.t_end, need_t, 2.0, 10.0),
            _grow(old.rate_top, need_rate, 1.5, 1.0),
        )

    def _build(self, stats: RunStats, limits: _Limits) -> None:
        """Full redraw: new axes and static parts, then cache them as the background."""
        self.fig.clf()
        gs = self.fig.add_gridspec(1, 3, width_ratios=[1.2, 1.0, 1.0], wspace=0.28,
                                   left=0.055, right=0.985, top=0.78, bottom=0.17)
        load, rate, inc = (self.fig.add_subplot(gs[i]) for i in range(3))
        self.load, self.rate, self.inc = load, rate, inc
        self.dynamic = []
        _build_load(self, load, stats, limits)
        _build_rate(self, rate, limits)
        _build_incidents(self, inc, limits)
        self.fig.canvas.draw()
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)  # type: ignore
        self.limits = limits
        self.full_draws += 1

    def _animated(self, artist: Any) -> Any:
        artist.set_animated(True)
        self.dynamic.append(artist)
        return artist

    def _update(self, stats: RunStats, t: Any, rows: Any, toks: Any) -> None:
        import numpy as np

        agents = stats.agents
        done = np.array([a.done_tokens for a in agents], dtype=float)
        stolen = np.array([a.stolen_tokens for a in agents], dtype=float)
        inflight = np.array([max(0, a.inflight_tokens) for a in agents], dtype=float)
        self.own_bars.set_verts(_bar_verts(np.zeros(len(agents)), done - stolen, 0.6))
        self.stolen_bars.set_verts(_bar_verts(done - stolen, done, 0.6))
        self.inflight_bars.set_verts(_bar_verts(done, done + inflight, 0.6))
        self.rate_line.set_data(t, rows)
        fill = np.concatenate([[[t[0], 0.0]], np.c_[t, rows], [[t[-1], 0.0]]]) if len(t) else (
            np.zeros((1, 2)))
        self.rate_fill.set_xy(fill)
        for y, kind in enumerate(self.inc_points):
            pts = [(ts, y) for ts, k in stats.incidents if k == kind]
            self.inc_points[kind].set_offsets(np.array(pts, dtype=float).reshape(-1, 2))
        for artist in self.dynamic:
            artist.axes.draw_artist(artist)

    def _png(self) -> bytes:
        from PIL import Image

        canvas: Any = self.fig.canvas
        w, h = canvas.get_width_height()
        img = Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def _grow(old: float, need: float, factor: float, floor: float) -> float:
    """Keep an axis limit while the data fits, else grow it by ``factor`` (at least ``floor``)."""
    return old if 0 < old and need <= old else max(floor, need * factor)


def _build_load(live: _LiveFigure, ax: Any, stats: RunStats, limits: _Limits) -> None:
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    from dfbatch.display.plots import _agent_ticks

    n = len(stats.agents)
    planned = np.array([a.planned_tokens for a in stats.agents], dtype=float)
    ax.add_collection(PolyCollection(
        _bar_verts(np.zeros(n), planned, 0.86), facecolors="none", linestyles="--",
        edgecolors=COLORS["planned"], linewidths=0.9))
    empty = _bar_verts(np.zeros(n), np.zeros(n), 0.6)
    live.own_bars = live._animated(ax.add_collection(
        PolyCollection(empty, facecolors=COLORS["done"], linewidths=0)))
    live.stolen_bars = live._animated(ax.add_collection(
        PolyCollection(empty, facecolors=COLORS["stolen"], linewidths=0)))
    live.inflight_bars = live._animated(ax.add_collection(
        PolyCollection(empty, facecolors=COLORS["inflight"], linewidths=0)))
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    ax.set_ylim(0, limits.load_top)
    _agent_ticks(ax, range(n))
    ax.grid(axis="x", visible=False)
    ax.yaxis.set_major_formatter(si_formatter())
    ax.set_xlabel("agent")
    ax.set_title("Agent load (tokens)", pad=16)
    handles = [Patch(facecolor="none", edgecolor=COLORS["planned"], linestyle="--",
                     label="planned")]
    handles += [Patch(color=COLORS[k], label=label) for k, label in
                (("done", "done"), ("stolen", "stolen"), ("inflight", "in flight"))]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.99), ncols=4,
              fontsize=8, handlelength=1.0, handleheight=0.6, columnspacing=0.9,
              handletextpad=0.4, borderaxespad=0.0, borderpad=0.0)


def _build_rate(live: _LiveFigure, ax: Any, limits: _Limits) -> None:
    from matplotlib.patches import Polygon

    live.rate_fill = live._animated(ax.add_patch(Polygon(
        [(0, 0)], closed=True, facecolor=COLORS["rows"], alpha=0.15, linewidth=0)))
    (line,) = ax.plot([], [], color=COLORS["rows"], linewidth=1.4)
    live.rate_line = live._animated(line)
    ax.set_xlim(0, limits.t_end)
    ax.set_ylim(0, limits.rate_top)
    ax.yaxis.set_major_formatter(si_formatter())
    ax.set_xlabel("time (s)")
    ax.set_title("Throughput (rows/s)", pad=16)
    _subtitle(ax, "rows finished per second, sliding window")


def _build_incidents(live: _LiveFigure, ax: Any, limits: _Limits) -> None:
    kinds = {"retry": COLORS["retried"], "429": COLORS["stolen"], "error": COLORS["failed"]}
    live.inc_points = {
        kind: live._animated(ax.scatter([], [], marker="|", s=120, color=colour,
                                        linewidths=1.3))
        for kind, colour in kinds.items()
    }
    ax.set_yticks(range(3), list(kinds))
    for label, colour in zip(ax.get_yticklabels(), kinds.values(), strict=True):
        label.set_color(colour)
        label.set_fontweight("bold")
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(-0.6, 2.6)
    ax.set_xlim(0, limits.t_end)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("time (s)")
    ax.set_title("Retries, 429s, errors", pad=16)
    _subtitle(ax, "one tick per event; counts in the header")


def _subtitle(ax: Any, text: str) -> None:
    ax.text(0.0, 1.025, text, transform=ax.transAxes, fontsize=8, va="bottom", color="#555555")


def _bar_verts(bottom: Any, top: Any, width: float) -> Any:
    """Rectangles (n, 4, 2) for bars at x = 0..n-1 from ``bottom`` to ``top``."""
    import numpy as np

    x = np.arange(len(bottom), dtype=float)
    x0, x1 = x - width / 2, x + width / 2
    return np.stack([np.c_[x0, bottom], np.c_[x1, bottom], np.c_[x1, top], np.c_[x0, top]],
                    axis=1)


def _rates(history: tuple[tuple[float, int, int], ...]) -> tuple[Any, Any, Any]:
    """Rows/s and tokens/s over a sliding window (~1/40 of the run, >= 1 s), <= 300 points."""
    import numpy as np

    if len(history) < 2:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    h = np.asarray(history, dtype=float)
    t, rows, toks = h[:, 0], h[:, 1], h[:, 2]
    window = max(1.0, (t[-1] - t[0]) / 40)
    j = np.searchsorted(t, t - window, side="left")
    j = np.minimum(j, np.arange(len(t)) - 1).clip(0)
    dt = t - t[j]
    ok = dt > 0
    step = max(1, int(ok.sum()) // 300)
    idx = np.flatnonzero(ok)[::step]
    return t[idx], (rows[idx] - rows[j[idx]]) / dt[idx], (toks[idx] - toks[j[idx]]) / dt[idx]
