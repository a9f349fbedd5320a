"""Trust at the edges (issue 15) in JupyterLab in headless chromium, at ~400 px: the live
figure's panels stack instead of shrinking; a run stopped with the Stop button, then resumed
from its checkpoint, says so. The dashboards' screenshots are kept in the test's output
(``tmp_path``, and ``$DFBATCH_SCREENSHOTS`` when set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_display_browser import lab, run_in_lab  # noqa: F401  (fixture)

CELLS = [
    """\
import asyncio, polars as pl, dfbatch
df = pl.DataFrame({"text": [f"review {i}: " + "good " * (i % 7) for i in range(120)]})

async def summarize(batch):
    await asyncio.sleep(0.4)
    return batch["text"].str.to_uppercase()

opts = dict(progress="widget", agents=2, max_concurrent_batches=2, items_per_batch=2,
            adaptive=False, checkpoint="ck")""",
    """\
first = await df.batch.aprocess(summarize, **opts)   # stopped with the Stop button
print("cancelled:", (first["error"] == "cancelled").sum())""",
    """\
again = df.batch.process(summarize, **opts)          # resumed from the checkpoint
print("errors:", again["error"].null_count(), again.height)""",
    "again.batch.plot_timeline()",
]


@pytest.mark.slow
def test_narrow_dashboard_stacks_panels_and_stop_then_resume_say_so(
    lab: tuple[str, str, Path], tmp_path: Path,  # noqa: F811
) -> None:
    shot = tmp_path / "edges.png"
    page = run_in_lab(lab, "edges.ipynb", CELLS, shot, "--width", "420", "--stop-at", "20")
    keep = os.environ.get("DFBATCH_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("edges*.png"):
            shutil.copy(png, Path(keep) / png.name)
    assert page["ok"], page.get("error")
    assert page["stoppedAt"], "the Stop button was never clicked"
    # the stopped run, then the resumed one
    stopped, resumed = page["headers"][:2]
    assert "stopped" in stopped and "cancelled rows" in stopped, stopped
    assert "ETA0inflight" in stopped.replace(" ", ""), stopped
    assert "done before (resumed)" in resumed and "120 / 120" in resumed, resumed
    # at ~400 px the three panels of each figure stack, each at a readable width
    panels = page["panels"][:3]
    assert len(panels) == 3, page["panels"]
    ys = [p[3] for p in panels]
    assert ys[0] < ys[1] < ys[2], panels
    assert all(p[4] >= 300 for p in panels), panels
    for i in range(2):
        assert (tmp_path / f"edges-dashboard-{i}.png").stat().st_size > 5_000
