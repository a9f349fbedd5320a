"""The dashboard in a real Jupyter kernel: live comm updates, final state, the Stop button."""

from __future__ import annotations

import re
import time
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

SETUP = """
import asyncio, polars as pl, dfbatch
df = pl.DataFrame({"text": [f"document number {i}" for i in range(60)]})
async def fn(batch):
    await asyncio.sleep(0.25)
    return batch["text"].str.to_uppercase()
opts = dict(agents=2, max_concurrent_batches=1, items_per_batch=2, adaptive=False)
"""
BLOCKING = """
out = df.batch.process(fn, progress="widget", **opts)  # ~4 s: 30 batches, 2 at a time
print("errors:", out["error"].null_count(), out.height)
"""
AWAITED = """
big = pl.concat([df, df])  # ~8 s unless stopped
res = await big.batch.aprocess(fn, progress="widget", **opts)
print("cancelled:", (res["error"] == "cancelled").sum(), res.height)
"""
PLOT = """
out.batch.plot_timeline()
"""
BLOCKING_STOP = """
res2 = pl.concat([df, df]).batch.process(fn, progress="widget", **opts)  # ~8 s unless stopped
print("blocking cancelled:", (res2["error"] == "cancelled").sum(), res2.height)
"""
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class RecordingClient(NotebookClient):
    """Records every iopub message with its arrival time; clicks Stop in the ``click_cells``
    (the await cell and a blocking one)."""

    def __init__(self, nb: Any, click_cells: tuple[int, ...], **kw: Any) -> None:
        super().__init__(nb, **kw)
        self.log_msgs: list[tuple[float, int, dict[str, Any]]] = []
        self.click_cells = click_cells
        self.clicks: dict[int, float] = {}

    @property
    def clicked_at(self) -> float | None:
        return self.clicks.get(self.click_cells[0])

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        self.log_msgs.append((time.monotonic(), cell_index, msg))
        if cell_index in self.click_cells and cell_index not in self.clicks:
            self._maybe_click(cell_index)
        return super().process_message(msg, cell, cell_index)

    def _maybe_click(self, cell_index: int) -> None:
        models = models_by_name(self.log_msgs, cell_index)
        bars = models.get("IntProgressModel", [])
        buttons = models.get("ButtonModel", [])
        if bars and buttons and len(updates(self.log_msgs, bars[0], "value")) >= 3:
            click = {"comm_id": buttons[0],
                     "data": {"method": "custom", "content": {"event": "click"}}}
            self.kc.shell_channel.send(self.kc.session.msg("comm_msg", click))
            self.clicks[cell_index] = time.monotonic()


def models_by_name(log: list[tuple[float, int, dict[str, Any]]], cell: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, i, m in log:
        if i == cell and m["msg_type"] == "comm_open":
            name = m["content"]["data"]["state"].get("_model_name", "")
            out.setdefault(name, []).append(m["content"]["comm_id"])
    return out


def updates(log: list[tuple[float, int, dict[str, Any]]], comm_id: str,
            key: str) -> list[tuple[float, Any]]:
    """(time, new value) of ``key`` in the comm's updates; binary values come as buffers."""
    out = []
    for t, _, m in log:
        if m["msg_type"] != "comm_msg" or m["content"]["comm_id"] != comm_id:
            continue
        data = m["content"]["data"]
        if key in data.get("state", {}):
            out.append((t, data["state"][key]))
        elif [key] in data.get("buffer_paths", []):
            out.append((t, bytes(m["buffers"][data["buffer_paths"].index([key])])))
    return out


def cell_span(log: list[tuple[float, int, dict[str, Any]]], cell: int) -> tuple[float, float]:
    times = [t for t, i, m in log if i == cell and m["msg_type"] in ("execute_input", "status")]
    return min(times), max(times)


def chip(html: str, label: str) -> str:
    m = re.search(rf"<b>([^<]*)</b> <span[^>]*>{re.escape(label)}</span>", html)
    assert m, f"no {label!r} in {html!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def run() -> tuple[RecordingClient, Any]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s)
                for s in (SETUP, BLOCKING, AWAITED, PLOT, BLOCKING_STOP, PLOT)]
    client = RecordingClient(nb, click_cells=(2, 4), timeout=120, kernel_name="python3",
                             allow_errors=False, store_widget_state=True)
    client.execute()
    return client, nb


@pytest.mark.slow
def test_widget_updates_stream_while_the_blocking_cell_runs(run: Any) -> None:
    client, nb = run
    log = client.log_msgs
    assert any(WIDGET_VIEW in o.get("data", {}) for o in nb.cells[1].outputs)
    models = models_by_name(log, 1)
    (bar,) = models["IntProgressModel"]
    image = models["ImageModel"][0]  # the first of the figure's three panels
    start, end = cell_span(log, 1)
    values = updates(log, bar, "value")
    assert end - start > 3.0, "the run should take ~4 s"
    during = [(t, v) for t, v in values if t < end - 0.3]
    assert len(during) >= 5, values
    assert during[-1][0] - during[0][0] > 1.0, "updates bunched up instead of streaming"
    assert all(0 < v < 60 for _, v in during[:-1])
    assert [v for _, v in values] == sorted(v for _, v in values)
    pictures = updates(log, image, "value")
    assert len(pictures) >= 2  # at least one live frame and the final one
    assert pictures[0][0] < end - 0.3
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for _, png in pictures)
    assert "errors: 60 60" in nb.cells[1].outputs[-1]["text"]


@pytest.mark.slow
def test_final_widget_state_shows_100_percent_and_the_counts(run: Any) -> None:
    client, _ = run
    models = models_by_name(client.log_msgs, 1)
    state = client.widget_state
    bar = state[models["IntProgressModel"][0]]
    assert (bar["value"], bar["max"], bar["description"]) == (60, 60, "100%")
    assert bar["bar_style"] == "success"
    header = next(state[c]["value"] for c in models["HTMLModel"]
                  if "rows/s" in state[c].get("value", ""))
    assert chip(header, "rows") == "60 / 60"
    assert [chip(header, k) for k in ("in flight", "retries", "429s", "errors")] == list("0000")
    assert ">done<" in header


@pytest.mark.slow
def test_stop_button_stops_an_awaited_run(run: Any) -> None:
    client, nb = run
    assert client.clicked_at is not None, "the Stop button never became clickable"
    start, end = cell_span(client.log_msgs, 2)
    assert end - client.clicked_at < 2.0, "the run went on after Stop"
    assert end - start < 6.0  # the full run takes ~8 s
    text = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    cancelled, height = map(int, re.search(r"cancelled: (\d+) (\d+)", text).groups())  # type: ignore[union-attr]
    assert height == 120 and 0 < cancelled < 120
    models = models_by_name(client.log_msgs, 2)
    bar = client.widget_state[models["IntProgressModel"][0]]
    assert bar["bar_style"] == "danger"
    assert bar["value"] == 120 - cancelled


@pytest.mark.slow
def test_plot_timeline_displays_as_png_once(run: Any) -> None:
    _, nb = run
    images = [o for o in nb.cells[3].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1


@pytest.mark.slow
def test_stop_button_stops_a_blocking_run(run: Any) -> None:
    """Under the blocking ``process()`` the cell's thread pumps the click to the run."""
    client, nb = run
    clicked = client.clicks.get(4)
    assert clicked is not None, "the Stop button never became clickable"
    models = models_by_name(client.log_msgs, 4)
    button = client.widget_state[models["ButtonModel"][0]]
    assert button["description"] == "Stopping" and button["disabled"]
    start, end = cell_span(client.log_msgs, 4)
    assert end - clicked < 2.0, "the blocking run went on after Stop"
    assert end - start < 6.0  # the full run takes ~8 s
    text = "".join(o.get("text", "") for o in nb.cells[4].outputs)
    found = re.search(r"blocking cancelled: (\d+) (\d+)", text)
    assert found, text
    cancelled, height = map(int, found.groups())
    assert height == 120 and 0 < cancelled < 120
    bar = client.widget_state[models["IntProgressModel"][0]]
    assert bar["bar_style"] == "danger" and bar["value"] == 120 - cancelled
    images = [o for o in nb.cells[5].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the kernel runs the next cell normally after the pumped one
