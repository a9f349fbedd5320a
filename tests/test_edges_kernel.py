"""Trust at the edges (issue 15) in a real Jupyter kernel: a kernel Interrupt under a blocking
``process()`` is a clean stop (no FrameError traceback from the figure's child process), the
``PartialResultWarning`` points at the cell, the header after the stop shows nothing in flight,
and the bar never says 100% before the end."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_display_kernel import chip, models_by_name, updates

SETUP = """
import asyncio, polars as pl, dfbatch
df = pl.DataFrame({"text": [f"document number {i}" for i in range(200)]})
async def fn(batch):
    await asyncio.sleep(0.25)
    return batch["text"].str.to_uppercase()
opts = dict(agents=2, max_concurrent_batches=4, items_per_batch=2, adaptive=False)
"""
BLOCKING = """
out = df.batch.process(fn, progress="widget", **opts)  # ~6 s unless interrupted
print("cancelled:", (out["error"] == "cancelled").sum(), out.height)
"""


class InterruptingClient(NotebookClient):
    """Interrupts the kernel once the blocking cell's bar has moved a few times."""

    def __init__(self, nb: Any, **kw: Any) -> None:
        super().__init__(nb, **kw)
        self.log_msgs: list[tuple[float, int, dict[str, Any]]] = []
        self.interrupted_at: float | None = None
        self._interrupt: Any = None

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        self.log_msgs.append((time.monotonic(), cell_index, msg))
        if cell_index == 1 and self.interrupted_at is None:
            bars = models_by_name(self.log_msgs, 1).get("IntProgressModel", [])
            if bars and len(updates(self.log_msgs, bars[0], "value")) >= 4:
                self.interrupted_at = time.monotonic()
                result = self.km.interrupt_kernel()
                if inspect.isawaitable(result):
                    self._interrupt = asyncio.ensure_future(result)
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def interrupted() -> tuple[InterruptingClient, Any]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (SETUP, BLOCKING)]
    client = InterruptingClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                                store_widget_state=True)
    client.execute()
    return client, nb


@pytest.mark.slow
def test_kernel_interrupt_under_blocking_process_is_a_clean_stop(interrupted: Any) -> None:
    client, nb = interrupted
    assert client.interrupted_at is not None, "the bar never moved"
    outputs = nb.cells[1].outputs
    text = "".join(o.get("text", "") for o in outputs)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    assert "FrameError" not in text and "Traceback" not in text, text
    assert "cancelled:" in text and "200" in text, text
    # the warning points at the cell's line, not at dfbatch or asyncio
    warning = next(line for line in text.splitlines() if "PartialResultWarning" in line)
    assert "dfbatch" not in warning.split(":")[0] and "asyncio" not in warning, warning
    assert "ipykernel" in warning or "<ipython" in warning or "/tmp/" in warning, warning


@pytest.mark.slow
def test_after_the_interrupt_the_header_shows_nothing_in_flight(interrupted: Any) -> None:
    client, _ = interrupted
    models = models_by_name(client.log_msgs, 1)
    state = client.widget_state
    header = next(state[c]["value"] for c in models["HTMLModel"]
                  if "rows/s" in state[c].get("value", ""))
    assert ">stopped<" in header
    assert chip(header, "in flight") == "0"
    assert int(chip(header, "cancelled rows")) > 0


@pytest.mark.slow
def test_the_bar_never_says_100_percent_before_the_end(interrupted: Any) -> None:
    client, _ = interrupted
    (bar,) = models_by_name(client.log_msgs, 1)["IntProgressModel"]
    labels = [v for _, v in updates(client.log_msgs, bar, "description")]
    assert labels and "100%" not in labels, labels  # stopped early: never 100%
