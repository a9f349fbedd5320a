"""The look shared by the live figure and the static plots: colours, rc style, Agg figures.

Imports nothing heavy at module level (no polars, no matplotlib), so that the frame process
(``frames``) starts fast; matplotlib is imported inside the functions.

>>> from dfbatch.display.style import COLORS, new_figure
>>> COLORS["ok"], type(new_figure(4, 3).canvas).__name__
('#4c9f70', 'FigureCanvasAgg')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["COLORS", "STYLE", "agent_ticks", "new_figure", "si_formatter"]

COLORS = {
    "ok": "#4c9f70",
    "retried": "#e0a030",
    "stolen": "#7b6cc4",
    "failed": "#d1495b",
    "planned": "#9aa5b1",
    "done": "#3b75af",
    "inflight": "#9ec5e8",
    "rows": "#3b75af",
    "tokens": "#e07b39",
}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titley": 1.0,  # fixed title position: no costly overlap search on every draw
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "figure.facecolor": "white",
}


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A Figure on the Agg canvas, outside pyplot (no global state, no double display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def agent_ticks(ax: Axes, agents: Any, axis: str = "x") -> None:
    """A tick per agent up to 24 agents, else integer ticks chosen by matplotlib."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    agents = sorted(set(int(a) for a in agents))
    fits = len(agents) <= 24
    locator = FixedLocator(agents) if fits else MaxNLocator(nbins=20, integer=True)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(locator)


def si_formatter() -> Any:
    """Tick labels as 1,234 / 45.6k / 2.5M, one unit and one number of decimals per axis (never
    ``5,000`` beside ``10.0k``).

    >>> f = si_formatter()
    >>> f.format_ticks([0, 5_000, 10_000, 15_000])
    ['0', '5k', '10k', '15k']
    >>> f.format_ticks([0, 2_500, 5_000, 7_500])
    ['0', '2,500', '5,000', '7,500']
    >>> f.format_ticks([0, 0.5, 1.0])
    ['0.0', '0.5', '1.0']
    """
    from matplotlib.ticker import Formatter

    class SIFormatter(Formatter):  # type: ignore[misc]
        scale, suffix, decimals = 1.0, "", 0

        def set_locs(self, locs: Any) -> None:
            super().set_locs(locs)
            top = max((abs(float(v)) for v in locs), default=0.0)
            self.scale, self.suffix = next(
                ((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= max(s, 1e4)),
                (1.0, ""))
            scaled = [float(v) / self.scale for v in locs]
            self.decimals = 0 if all(abs(v - round(v)) < 1e-9 for v in scaled) else 1

        def __call__(self, x: float, pos: int | None = None) -> str:
            if x == 0:
                return "0" if self.suffix else f"{0:.{self.decimals}f}"
            return f"{x / self.scale:,.{self.decimals}f}{self.suffix}"

    return SIFormatter()


