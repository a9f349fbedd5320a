"""The dashboard's figure: a RunStats snapshot drawn with Agg into PNG bytes, cheaply.

Three panels: per-agent load (planned tokens outlined; done, stolen and in-flight tokens as
stacked bars), throughput over time (rows/s over a sliding window), and the retry / 429 /
error timeline. Axes, ticks, labels and legends are drawn once and cached (blitting); a frame
restores that background and draws only the data. A full redraw happens only when a limit
grows (time x2, y x1.3-1.5), the number of agents changes, or for the final frame.

Styles are set on the artists, never through global rcParams, so frames may be drawn in a
worker thread while the notebook plots something else.

Examples
--------
>>> from dfbatch.events import RunStats
>>> from dfbatch.display.live_figure import LiveFigure
>>> png = LiveFigure().render(RunStats(total_rows=4, rows_done=1, elapsed_s=1.0))
>>> png[:8]
b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import io
import itertools
from typing import Any, NamedTuple

from dfbatch.display.style import COLORS, agent_ticks, new_figure, si_formatter
from dfbatch.events import RunStats

__all__ = ["LiveFigure", "rates"]

_TITLE = {"loc": "left", "fontsize": 10, "fontweight": "bold", "y": 1.0, "pad": 16}
_GREY = "#555555"
_KINDS = {"retry": COLORS["retried"], "429": COLORS["stolen"], "error": COLORS["failed"]}
_LANES = {"retry": "other retry", "429": "429 retry", "error": "error"}


class Limits(NamedTuple):
    agents: int
    load_top: float
    t_end: float
    rate_top: float


class LiveFigure:
    """Renders snapshots of one run; keep one per run (it caches its background)."""

    def __init__(self, width: float = 11.0, height: float = 2.75, dpi: float = 96) -> None:
        self.fig = new_figure(width, height, dpi=dpi, facecolor="white")
        self.limits: Limits | None = None
        self.full_draws = 0
        self.background: Any = None
        self.dynamic: list[Any] = []  # artists redrawn in every frame
        self.axes: dict[str, Any] = {}
        self.bars: dict[str, Any] = {}
        self.rate_line: Any = None
        self.rate_fill: Any = None
        self.points: dict[str, Any] = {}
        self.cuts: list[tuple[int, int]] = []  # pixel columns of the three panels

    def render(self, stats: RunStats, *, final: bool = False) -> bytes:
        """PNG bytes of the figure for ``stats``; ``final`` fits the limits to the data."""
        self._frame(stats, final)
        return _encode(self._image())

    def render_panels(self, stats: RunStats, *, final: bool = False) -> tuple[bytes, ...]:
        """The same frame as one PNG per panel (load, throughput, incidents), cut between the
        panels, so that a narrow output can stack them instead of shrinking all three."""
        self._frame(stats, final)
        img = self._image()
        return tuple(_encode(img.crop((x0, 0, x1, img.height))) for x0, x1 in self.cuts)

    def _frame(self, stats: RunStats, final: bool) -> None:
        t, rows, _ = rates(stats.history)
        limits = self._limits(stats, rows, final=final)
        if self.limits is None or limits.agents != self.limits.agents:
            self._layout(stats)
        if limits != self.limits:
            self._rescale(limits)
        else:
            self.fig.canvas.restore_region(self.background)  # type: ignore[attr-defined]
        self._draw_data(stats, t, rows)

    def _limits(self, stats: RunStats, rows: Any, *, final: bool) -> Limits:
        need_load = max((max(a.planned_tokens, a.done_tokens + max(0, a.inflight_tokens))
                         for a in stats.agents), default=0)
        need_t = stats.elapsed_s
        need_rate = float(rows.max()) if len(rows) else 0.0
        if final:
            return Limits(len(stats.agents), max(1.0, need_load * 1.08), max(1.0, need_t),
                          max(1.0, need_rate * 1.1))
        old = self.limits
        if old is None or old.agents != len(stats.agents):
            old = Limits(len(stats.agents), 0.0, 0.0, 0.0)
        return Limits(
            old.agents,
            _grow(old.load_top, need_load, 1.3, 1.0),
            _grow(old.t_end, need_t, 2.0, 10.0),
            _grow(old.rate_top, need_rate, 1.5, 1.0),
        )

    def _layout(self, stats: RunStats) -> None:
        """New axes with their static parts (once, and again if the number of agents changes)."""
        self.fig.clf()
        gs = self.fig.add_gridspec(1, 3, width_ratios=[1.2, 1.0, 1.0], wspace=0.45,
                                   left=0.055, right=0.985, top=0.8, bottom=0.18)
        load, rate, inc = (_styled(self.fig.add_subplot(gs[i])) for i in range(3))
        self.axes = {"load": load, "rate": rate, "inc": inc}
        self.dynamic = []
        self._layout_load(load, stats)
        self._layout_rate(rate)
        self._layout_incidents(inc)

    def _rescale(self, limits: Limits) -> None:
        """Full redraw with new axis limits; the result is cached as the background."""
        self.axes["load"].set_ylim(0, limits.load_top)
        self.axes["rate"].set_xlim(0, limits.t_end)
        self.axes["rate"].set_ylim(0, limits.rate_top)
        self.axes["inc"].set_xlim(0, limits.t_end)
        self.fig.canvas.draw()
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)  # type: ignore
        self.limits = limits
        self.full_draws += 1
        self.cuts = self._panel_cuts()

    def _panel_cuts(self) -> list[tuple[int, int]]:
        """Pixel columns of each panel (its labels, title and legend included), cut halfway
        between neighbours."""
        renderer = self.fig.canvas.get_renderer()  # type: ignore[attr-defined]
        width = int(self.fig.bbox.width)
        boxes = [self.axes[k].get_tightbbox(renderer) for k in ("load", "rate", "inc")]
        edges = [0] + [int(b.x0 - 2 if a.x1 <= b.x0 - 2 else (a.x1 + b.x0) / 2)
                       for a, b in itertools.pairwise(boxes)] + [width]
        return [(max(0, x0), min(width, x1)) for x0, x1 in itertools.pairwise(edges)]

    def _animated(self, artist: Any) -> Any:
        artist.set_animated(True)
        self.dynamic.append(artist)
        return artist

    def _layout_load(self, ax: Any, stats: RunStats) -> None:
        import numpy as np
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch

        n = len(stats.agents)
        planned = np.array([a.planned_tokens for a in stats.agents], dtype=float)
        ax.add_collection(PolyCollection(
            _bar_verts(np.zeros(n), planned, 0.86), facecolors="none", linestyles="--",
            edgecolors=COLORS["planned"], linewidths=0.9))
        empty = _bar_verts(np.zeros(n), np.zeros(n), 0.6)
        for key in ("done", "stolen", "inflight"):
            self.bars[key] = self._animated(ax.add_collection(
                PolyCollection(empty, facecolors=COLORS[key], linewidths=0)))
        ax.set_xlim(-0.6, max(n, 1) - 0.4)
        agent_ticks(ax, range(n))
        _few_ticks(ax.yaxis)
        ax.grid(axis="x", visible=False)
        ax.yaxis.set_major_formatter(si_formatter())
        ax.set_xlabel("agent", fontsize=9)
        ax.set_title("Agent load (request tokens)", **_TITLE)
        handles = [Patch(facecolor="none", edgecolor=COLORS["planned"], linestyle="--",
                         label="planned")]
        handles += [Patch(color=COLORS[k], label=label) for k, label in
                    (("done", "done"), ("stolen", "stolen"), ("inflight", "in flight"))]
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 0.99), ncols=4,
                  fontsize=8, frameon=False, handlelength=1.0, handleheight=0.6,
                  columnspacing=0.9, handletextpad=0.4, borderaxespad=0.0, borderpad=0.0)

    def _layout_rate(self, ax: Any) -> None:
        from matplotlib.patches import Polygon

        self.rate_fill = self._animated(ax.add_patch(Polygon(
            [(0, 0)], closed=True, facecolor=COLORS["rows"], alpha=0.15, linewidth=0)))
        (line,) = ax.plot([], [], color=COLORS["rows"], linewidth=1.4)
        self.rate_line = self._animated(line)
        _few_ticks(ax.xaxis)
        _few_ticks(ax.yaxis)
        ax.yaxis.set_major_formatter(si_formatter())
        ax.set_xlabel("time (s)", fontsize=9)
        ax.set_title("Throughput (rows/s)", **_TITLE)
        _subtitle(ax, "rows finished per second, sliding window")

    def _layout_incidents(self, ax: Any) -> None:
        self.points = {
            kind: self._animated(ax.scatter([], [], marker="|", s=120, color=colour,
                                            linewidths=1.3))
            for kind, colour in _KINDS.items()
        }
        ax.set_yticks(range(3), [_LANES[k] for k in _KINDS])
        for label, colour in zip(ax.get_yticklabels(), _KINDS.values(), strict=True):
            label.set_color(colour)
            label.set_fontweight("bold")
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(-0.6, 2.6)
        _few_ticks(ax.xaxis)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("time (s)", fontsize=9)
        ax.set_title("Retries, 429s, errors", **_TITLE)
        _subtitle(ax, "one tick each; retries = 429 + other")

    def _draw_data(self, stats: RunStats, t: Any, rows: Any) -> None:
        import numpy as np

        agents = stats.agents
        done = np.array([a.done_tokens for a in agents], dtype=float)
        stolen = np.array([a.stolen_tokens for a in agents], dtype=float)
        inflight = np.array([max(0, a.inflight_tokens) for a in agents], dtype=float)
        self.bars["done"].set_verts(_bar_verts(np.zeros(len(agents)), done - stolen, 0.6))
        self.bars["stolen"].set_verts(_bar_verts(done - stolen, done, 0.6))
        self.bars["inflight"].set_verts(_bar_verts(done, done + inflight, 0.6))
        self.rate_line.set_data(t, rows)
        fill = (np.concatenate([[[t[0], 0.0]], np.c_[t, rows], [[t[-1], 0.0]]]) if len(t)
                else np.zeros((1, 2)))
        self.rate_fill.set_xy(fill)
        for y, kind in enumerate(self.points):
            pts = [(ts, y) for ts, k in stats.incidents if k == kind]
            self.points[kind].set_offsets(np.array(pts, dtype=float).reshape(-1, 2))
        for artist in self.dynamic:
            artist.axes.draw_artist(artist)

    def _image(self) -> Any:
        from PIL import Image

        canvas: Any = self.fig.canvas
        w, h = canvas.get_width_height()
        img = Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        return img.convert("RGB")


def _encode(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def rates(history: tuple[tuple[float, int, int], ...]) -> tuple[Any, Any, Any]:
    """Rows/s and tokens/s over a sliding window (~1/40 of the run, >= 1 s), <= 300 points.

    >>> t, rows, toks = rates(((0.0, 0, 0), (1.0, 10, 100), (2.0, 30, 300)))
    >>> t.tolist(), rows.tolist(), toks.tolist()
    ([1.0, 2.0], [10.0, 20.0], [100.0, 200.0])
    """
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


def _styled(ax: Any) -> Any:
    """The look of plots.STYLE, set on the axes (ticks created later inherit it)."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=9)
    ax.set_facecolor("white")
    return ax


def _grow(old: float, need: float, factor: float, floor: float) -> float:
    """Keep an axis limit while the data fits, else grow it by ``factor`` (at least ``floor``)."""
    return old if 0 < old and need <= old else max(floor, need * factor)


def _few_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))


def _subtitle(ax: Any, text: str) -> None:
    ax.text(0.0, 1.025, text, transform=ax.transAxes, fontsize=8, va="bottom", color=_GREY)


def _bar_verts(bottom: Any, top: Any, width: float) -> Any:
    """Rectangles (n, 4, 2) for bars at x = 0..n-1 from ``bottom`` to ``top``."""
    import numpy as np

    x = np.arange(len(bottom), dtype=float)
    x0, x1 = x - width / 2, x + width / 2
    return np.stack([np.c_[x0, bottom], np.c_[x1, bottom], np.c_[x1, top], np.c_[x0, top]],
                    axis=1)

