"""Static plots of a finished run, built from the result frame alone (matplotlib, no pyplot).

``plot_timeline`` draws a Gantt chart of the batches each agent ran; ``plot_agent_load``
compares agents by tokens, rows, busy time and errors. Both return a
``matplotlib.figure.Figure`` that displays once in a notebook and can be saved with
``fig.savefig(...)``.

Examples
--------
>>> from datetime import datetime, timezone
>>> import polars as pl
>>> from dfbatch.display.plots import plot_timeline, plot_agent_load
>>> t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
>>> result = pl.DataFrame({
...     "text": ["a", "b", "c"], "n_tokens": [5, 7, 9], "batch_id": [0, 0, 1],
...     "agent_id": [0, 0, 1], "output": ["A", "B", None], "error": [None, None, "boom"],
...     "attempts": [1, 1, 3], "run_batch_id": [0, 0, 1], "run_agent_id": [0, 0, 0],
...     "started_at": [t0, t0, t0], "elapsed_s": [1.5, 1.5, 0.5],
... })
>>> fig = plot_timeline(result)
>>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
('time since run start (s)', 'agent')
>>> [ax.get_title(loc="left") for ax in plot_agent_load(result).axes]
['text tokens (n_tokens)', 'rows', 'busy time (wall-clock s)', 'rows with errors']
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any, cast

import polars as pl

from dfbatch.config import Columns
from dfbatch.display.style import COLORS, STYLE, agent_ticks, new_figure, si_formatter

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["COLORS", "STATUSES", "agent_table", "batch_table", "plot_agent_load", "plot_timeline"]

STATUSES = ("ok", "retried", "stolen", "failed")


def batch_table(result: pl.DataFrame, columns: Columns | None = None) -> pl.DataFrame:
    """One row per batch that ran: agent, planned agent, start (s), elapsed, status, sizes.

    ``status`` is the first that applies of: failed (a row has an error), retried (attempts
    > 1), stolen (run by another agent than planned), ok. Batches that never ran are left out.
    """
    c = columns or Columns()
    _require(result, [c.run_batch_id, c.run_agent_id, c.agent_id, c.started_at, c.elapsed_s])
    ran = result.filter(pl.col(c.started_at).is_not_null())
    t0 = ran[c.started_at].min()
    err = pl.col(c.error).is_not_null() if c.error in result.columns else pl.lit(False)
    attempts = pl.col(c.attempts) if c.attempts in result.columns else pl.lit(1)
    tokens = pl.col(c.n_tokens) if c.n_tokens in result.columns else pl.lit(0)
    table = ran.group_by(c.run_batch_id, maintain_order=True).agg(
        agent=pl.col(c.run_agent_id).first().cast(pl.Int64),
        planned_agent=pl.col(c.agent_id).first().cast(pl.Int64),
        start_s=(pl.col(c.started_at).first() - pl.lit(t0, dtype=result.schema[c.started_at])
                 ).dt.total_microseconds() / 1e6,  # (t0 None: no batch ran)
        elapsed_s=pl.col(c.elapsed_s).first().fill_null(0.0),
        attempts=attempts.max(),
        failed=err.any(),
        error_rows=err.sum(),
        rows=pl.len(),
        tokens=tokens.sum(),
    )
    status = (
        pl.when("failed").then(pl.lit("failed"))
        .when(pl.col("attempts") > 1).then(pl.lit("retried"))
        .when(pl.col("agent") != pl.col("planned_agent")).then(pl.lit("stolen"))
        .otherwise(pl.lit("ok"))
    )
    return table.with_columns(status=status).drop("failed").sort("start_s")


def plot_timeline(
    result: pl.DataFrame, ax: Axes | None = None, *, columns: Columns | None = None
) -> Figure:
    """Gantt chart of the batches each agent ran, coloured by status.

    Each agent gets one band (y = ``run_agent_id``); batches that overlap in time (an agent
    runs several at once) are stacked in lanes inside the band. x is seconds since the first
    batch started. Colours: ok, retried (attempts > 1), stolen (run by another agent than
    planned), failed (error not null); see ``batch_table`` for the precedence.

    Parameters
    ----------
    result
        A frame returned by ``process`` (needs ``run_batch_id``, ``run_agent_id``,
        ``agent_id``, ``started_at``, ``elapsed_s``; uses ``error`` and ``attempts``).
    ax
        Draw into this Axes instead of a new figure.
    columns
        Column names, when the run renamed them.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    table = batch_table(result, columns)
    _register_notebook_png()
    with _style():
        if ax is None:
            height = min(10.0, 1.6 + 0.32 * max(1, _n_agents(table)))
            ax = new_figure(9.0, height).add_subplot()
        fig = ax.get_figure(root=True)
        assert fig is not None
        lane, lanes = _lanes(table)
        agents = table["agent"].to_numpy()
        handles = []
        for status in STATUSES:
            mask = (table["status"] == status).to_numpy()
            n = int(mask.sum())
            if n:
                ax.add_collection(PolyCollection(
                    _boxes(table, lane, lanes, mask, agents), closed=True,
                    facecolors=COLORS[status], edgecolors="white", linewidths=0.3,
                ))
            handles.append(Patch(color=COLORS[status], label=f"{status} ({n})"))
        cancelled = _cancelled_rows(result, columns or Columns())
        if cancelled:  # a stopped run: rows that never ran (no bar to draw)
            handles.append(Patch(facecolor="white", edgecolor=COLORS["planned"], hatch="///",
                                 label=f"cancelled ({cancelled:,} rows, not run)"))
        _timeline_axes(ax, table, handles, result.height - cancelled, result.height)
    return fig  # type: ignore[return-value]


def plot_agent_load(result: pl.DataFrame, *, columns: Columns | None = None) -> Figure:
    """Per-agent tokens, rows, busy time and rows with errors (four panels, one bar per agent).

    Agent = the agent that actually ran the rows (``run_agent_id``; the planned ``agent_id``
    for rows that never ran). The tokens panel outlines each agent's planned tokens and shows
    the tokens it took from other agents (stolen) in a second colour.
    """
    c = columns or Columns()
    per_agent = agent_table(result, c)
    _register_notebook_png()
    with _style():
        fig = new_figure(9.0, 5.0, layout="constrained")
        axes = fig.subplots(2, 2, sharex=True).ravel()
        x = per_agent["agent"].to_numpy()
        ax = axes[0]
        ax.bar(x, per_agent["planned_tokens"], width=0.84, fill=False,
               edgecolor=COLORS["planned"], linestyle="--", label="planned")
        own = per_agent["tokens"] - per_agent["stolen_tokens"]
        ax.bar(x, own, width=0.6, color=COLORS["done"], label="ran (own)")
        ax.bar(x, per_agent["stolen_tokens"], width=0.6, bottom=own,
               color=COLORS["stolen"], label="ran (stolen)")
        fig.legend(loc="outside upper right", ncols=3)  # above the panels, never on a bar
        ax.yaxis.set_major_formatter(si_formatter())
        _bars(axes[1], x, per_agent["rows"], COLORS["rows"])
        _bars(axes[2], x, per_agent["busy_s"], COLORS["ok"])
        _bars(axes[3], x, per_agent["error_rows"], COLORS["failed"])
        _count_axis(axes[1], per_agent["rows"])
        _count_axis(axes[3], per_agent["error_rows"])
        titles = ["text tokens (n_tokens)", "rows", "busy time (wall-clock s)",
                  "rows with errors"]
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.grid(axis="x", visible=False)
            agent_ticks(ax, x)
        for ax in axes[2:]:
            ax.set_xlabel("agent")
        if len(x):
            axes[0].set_xlim(x.min() - 0.6, x.max() + 0.6)
        fig.suptitle(f"Agent load · {result.height:,} rows", x=0.01, ha="left", fontsize=11,
                     fontweight="bold")
    return fig


def agent_table(result: pl.DataFrame, columns: Columns | None = None) -> pl.DataFrame:
    """One row per agent: planned tokens, tokens / rows it ran, stolen tokens, busy s, errors."""
    c = columns or Columns()
    _require(result, [c.agent_id, c.run_agent_id])
    tokens = pl.col(c.n_tokens) if c.n_tokens in result.columns else pl.lit(0)
    err = pl.col(c.error).is_not_null() if c.error in result.columns else pl.lit(False)
    agent = pl.coalesce(c.run_agent_id, c.agent_id).cast(pl.Int64)
    stolen = pl.col(c.run_agent_id).is_not_null() & (pl.col(c.run_agent_id) != pl.col(c.agent_id))
    ran = result.with_columns(agent=agent, _tok=tokens, _err=err, _stolen=stolen)
    per_agent = ran.group_by("agent").agg(
        tokens=pl.col("_tok").sum(),
        stolen_tokens=pl.col("_tok").filter("_stolen").sum(),
        rows=pl.len(),
        error_rows=pl.col("_err").sum(),
    )
    planned = ran.group_by(pl.col(c.agent_id).cast(pl.Int64).alias("agent")).agg(
        planned_tokens=pl.col("_tok").sum()
    )
    busy = pl.DataFrame(schema={"agent": pl.Int64, "busy_s": pl.Float64})
    if c.started_at in result.columns and c.run_batch_id in result.columns:
        busy = _wall_busy(batch_table(result, c))
    agents = pl.concat([per_agent.select("agent"), planned.select("agent")]).unique()
    return (
        agents.join(per_agent, on="agent", how="left")
        .join(planned, on="agent", how="left")
        .join(busy, on="agent", how="left")
        .fill_null(0)
        .sort("agent")
    )


def _cancelled_rows(result: pl.DataFrame, c: Columns) -> int:
    if c.error not in result.columns:
        return 0
    return int((result[c.error] == "cancelled").sum())


def _timeline_axes(ax: Axes, table: pl.DataFrame, handles: list[Any], n_ran: int,
                   n_rows: int) -> None:
    from matplotlib.figure import Figure

    agents = sorted(set(table["agent"].to_list())) or [0]
    end = table.select((pl.col("start_s") + pl.col("elapsed_s")).max()).item() or 1.0
    ax.set_xlim(0, end * 1.02 if end > 0 else 1.0)
    ax.set_ylim(min(agents) - 0.6, max(agents) + 0.6)
    ax.invert_yaxis()
    agent_ticks(ax, agents, axis="y")
    ax.grid(axis="y", visible=False)
    for a in agents[1::2]:
        ax.axhspan(a - 0.5, a + 0.5, color="#f2f4f7", zorder=0, linewidth=0)
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel("agent")
    rows = f"{n_rows:,} rows" if n_ran == n_rows else f"{n_ran:,} of {n_rows:,} rows (stopped)"
    ax.set_title(f"Batches per agent · {table.height:,} batches, {rows}")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig = ax.get_figure(root=True)
    if isinstance(fig, Figure) and not fig.get_layout_engine():
        fig.set_layout_engine("constrained")


def _lanes(table: pl.DataFrame) -> tuple[list[int], list[int]]:
    """Greedy interval partitioning per agent: the lane of each batch, and lanes per batch."""
    lane = [0] * table.height
    free: dict[int, list[tuple[float, int]]] = {}
    used: dict[int, int] = {}
    rows = zip(table["agent"], table["start_s"], table["elapsed_s"], strict=True)
    for i, (agent, start, elapsed) in enumerate(rows):
        heap = free.setdefault(agent, [])
        if heap and heap[0][0] <= start + 1e-9:
            _, k = heapq.heappop(heap)
        else:
            k = used.get(agent, 0)
            used[agent] = k + 1
        lane[i] = k
        heapq.heappush(heap, (start + elapsed, k))
    return lane, [used[a] for a in table["agent"]]


def _boxes(table: pl.DataFrame, lane: list[int], lanes: list[int], mask: Any, agents: Any) -> Any:
    import numpy as np

    x0 = table["start_s"].to_numpy()[mask]
    x1 = x0 + np.maximum(table["elapsed_s"].to_numpy()[mask], 1e-3)
    n_lanes = np.asarray(lanes)[mask]
    h = 0.84 / n_lanes
    y0 = agents[mask] - 0.42 + np.asarray(lane)[mask] * h
    y1 = y0 + h * 0.92
    return np.stack([np.c_[x0, y0], np.c_[x1, y0], np.c_[x1, y1], np.c_[x0, y1]], axis=1)


def _wall_busy(table: pl.DataFrame) -> pl.DataFrame:
    """Per agent, the wall-clock seconds at least one of its batches was running (the union
    of its batches' intervals: concurrent batches count once, so it is <= the run's length)."""
    out: dict[int, float] = {}
    for (agent,), part in table.sort("start_s").group_by("agent"):
        busy, end = 0.0, float("-inf")
        for start, elapsed in zip(part["start_s"], part["elapsed_s"], strict=True):
            stop = start + elapsed
            if start > end:
                busy += elapsed
            elif stop > end:
                busy += stop - end
            end = max(end, stop)
        out[int(agent)] = busy  # type: ignore[call-overload]
    return pl.DataFrame({"agent": list(out), "busy_s": list(out.values())},
                        schema={"agent": pl.Int64, "busy_s": pl.Float64})


def _count_axis(ax: Axes, values: pl.Series) -> None:
    """Whole numbers from 0 (a panel of zeros gets 0..1, not -0.04..0.04)."""
    from matplotlib.ticker import MaxNLocator

    top = float(values.max() or 0) if len(values) else 0.0  # type: ignore[arg-type]
    ax.set_ylim(0, max(1.0, top * 1.08))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.yaxis.set_major_formatter(_si())


def _si() -> Any:
    return si_formatter()


def _bars(ax: Axes, x: Any, values: pl.Series, color: str) -> None:
    ax.bar(x, values, width=0.6, color=color)


def _n_agents(table: pl.DataFrame) -> int:
    return table["agent"].n_unique() if table.height else 1


def _require(result: pl.DataFrame, names: list[str]) -> None:
    missing = [n for n in names if n not in result.columns]
    if missing:
        msg = (
            f"result is missing column(s) {missing}; plots need a frame returned by "
            "process() (pass columns=Columns(...) if the run renamed them)"
        )
        raise ValueError(msg)


def _style() -> Any:
    import matplotlib as mpl

    return mpl.rc_context(cast(Any, STYLE))


def _register_notebook_png() -> None:
    """Make IPython show a returned Figure as PNG (pyplot's inline backend may be unused)."""
    import sys

    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        from IPython.core.pylabtools import print_figure

        formatter.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
