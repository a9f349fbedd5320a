"""Static plots from a result frame (Agg, no pyplot)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from dfbatch.config import Columns
from dfbatch.display.plots import (
    COLORS,
    agent_table,
    batch_table,
    plot_agent_load,
    plot_timeline,
)
from tests.test_display_helpers import synthetic_result

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def small_result() -> pl.DataFrame:
    """4 batches on 2 agents: ok, retried, stolen (planned 0, ran on 1), failed; 1 never ran."""
    def at(s: float) -> datetime:
        return T0 + timedelta(seconds=s)

    return pl.DataFrame({
        "text": list("abcdefg"),
        "n_tokens": [10, 20, 30, 40, 50, 60, 70],
        "batch_id": [0, 0, 1, 2, 3, 3, 4],
        "agent_id": [0, 0, 0, 0, 1, 1, 1],
        "output": ["A", "B", "C", "D", None, "F", None],
        "error": [None, None, None, None, "boom", None, "cancelled"],
        "attempts": [1, 1, 3, 1, 1, 1, 0],
        "run_batch_id": [0, 0, 1, 2, 3, 3, None],
        "run_agent_id": [0, 0, 0, 1, 1, 1, None],
        "started_at": [at(1), at(1), at(2), at(0.5), at(3), at(3), None],
        "elapsed_s": [2.0, 2.0, 1.0, 1.5, 0.5, 0.5, None],
    }, schema_overrides={"started_at": pl.Datetime("us", "UTC")})


def test_batch_table_status_start_and_busy_time() -> None:
    t = batch_table(small_result())
    assert t["run_batch_id"].to_list() == [2, 0, 1, 3]  # sorted by start
    assert t["status"].to_list() == ["stolen", "ok", "retried", "failed"]
    assert t["start_s"].to_list() == [0.0, 0.5, 1.5, 2.5]
    assert t["rows"].to_list() == [1, 2, 1, 2]
    assert t["tokens"].to_list() == [40, 30, 30, 110]


def test_agent_table_counts_rows_tokens_stolen_busy_and_errors() -> None:
    a = agent_table(small_result())
    assert a["agent"].to_list() == [0, 1]
    assert a["rows"].to_list() == [3, 4]  # the row that never ran counts for its planned agent
    assert a["tokens"].to_list() == [60, 220]
    assert a["planned_tokens"].to_list() == [100, 180]
    assert a["stolen_tokens"].to_list() == [0, 40]
    assert a["busy_s"].to_list() == [2.0, 2.0]  # wall clock: agent 0's two batches overlap
    assert a["error_rows"].to_list() == [0, 2]


def test_timeline_draws_every_batch_in_its_status_colour() -> None:
    from matplotlib.colors import to_hex

    fig = plot_timeline(small_result())
    (ax,) = fig.axes
    assert ax.get_xlabel() == "time since run start (s)"
    assert ax.get_ylabel() == "agent"
    colours = {to_hex(c.get_facecolor()[0]): len(c.get_paths()) for c in ax.collections}
    assert colours == {COLORS[s]: 1 for s in ("ok", "retried", "stolen", "failed")}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ok (1)", "retried (1)", "stolen (1)", "failed (1)",
                      "cancelled (1 rows, not run)"]
    assert [int(t) for t in ax.get_yticks()] == [0, 1]
    assert ax.get_xlim()[1] >= 3.0  # the last batch ends 3.0 s after the first started


def test_timeline_lanes_never_overlap_within_an_agent() -> None:
    result = synthetic_result(n_agents=3, n_batches=60)
    fig = plot_timeline(result)
    boxes = [p.vertices for c in fig.axes[0].collections for p in c.get_paths()]
    assert len(boxes) == 60
    spans = [(v[:, 0].min(), v[:, 0].max(), v[:, 1].min(), v[:, 1].max()) for v in boxes]
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            overlap_x = a[0] < b[1] - 1e-9 and b[0] < a[1] - 1e-9
            overlap_y = a[2] < b[3] - 1e-9 and b[2] < a[3] - 1e-9
            assert not (overlap_x and overlap_y)


def test_timeline_draws_into_a_given_axes() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot_timeline(small_result(), ax=ax) is fig
    assert ax.get_title(loc="left") == "Batches per agent · 4 batches, 6 of 7 rows (stopped)"
    assert len(ax.collections) == 4


def test_agent_load_has_four_panels_with_one_bar_per_agent() -> None:
    result = synthetic_result(n_agents=5)
    fig = plot_agent_load(result)
    assert len(fig.axes) == 4
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["text tokens (n_tokens)", "rows", "busy time (wall-clock s)",
                      "rows with errors"]
    for ax in fig.axes[1:]:
        assert len(ax.patches) == 5
    assert len(fig.axes[0].patches) == 3 * 5  # planned outline, own, stolen
    assert [ax.get_xlabel() for ax in fig.axes[2:]] == ["agent", "agent"]
    rows = [p.get_height() for p in fig.axes[1].patches]
    assert sum(rows) == result.height


def test_plots_accept_renamed_columns() -> None:
    cols = Columns(run_agent_id="ran_on", started_at="t_start")
    result = small_result().rename({"run_agent_id": "ran_on", "started_at": "t_start"})
    assert plot_timeline(result, columns=cols).axes
    assert plot_agent_load(result, columns=cols).axes


def test_missing_columns_name_the_column_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['run_batch_id'.*columns=Columns"):
        plot_timeline(pl.DataFrame({"text": ["a"]}))


def test_figures_render_to_png() -> None:
    import io

    for fig in (plot_timeline(synthetic_result()), plot_agent_load(synthetic_result())):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_stopped_before_any_batch_ran_draws_an_empty_timeline() -> None:
    """Ctrl-C before the first call: every row's started_at is null; the demo still plots."""
    import dfbatch

    out = dfbatch.process(pl.DataFrame({"text": ["a", "b"]}), lambda b: [1] * b.height,
                          progress=False)
    never = out.with_columns(pl.lit(None, dtype=out.schema["started_at"]).alias("started_at"),
                             pl.lit(None, dtype=pl.Float64).alias("elapsed_s"))
    assert batch_table(never).height == 0
    assert plot_timeline(never) is not None
