"""process() and await aprocess() inside a real Jupyter kernel (nbclient + ipykernel)."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

SETUP = """
import asyncio, polars as pl, dfbatch
df = pl.DataFrame({"text": [f"doc {i}" for i in range(50)]})
async def fn(batch):
    await asyncio.sleep(0.01)
    return batch["text"].str.to_uppercase()
def sync_fn(batch):
    return [t[::-1] for t in batch["text"]]
"""
BLOCKING = """
out = df.batch.process(fn, progress=False)
assert out["output"].to_list() == [t.upper() for t in df["text"]], out
assert out["error"].null_count() == 50
out2 = df.batch.process(sync_fn, progress=False)
assert out2["output"].to_list() == [t[::-1] for t in df["text"]]
print("blocking ok", out.height)
"""
AWAITED = """
res = await df.batch.aprocess(fn, progress=False)
assert res["output"].to_list() == [t.upper() for t in df["text"]]
print("await ok", res.height)
"""


@pytest.mark.slow
def test_process_and_aprocess_in_a_kernel() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (SETUP, BLOCKING, AWAITED, BLOCKING)]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=False)
    client.execute()
    texts = ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells]
    assert "blocking ok 50" in texts[1]
    assert "await ok 50" in texts[2]
    assert "blocking ok 50" in texts[3]  # the nested loop still works after an await cell


@pytest.mark.slow
def test_cells_queued_while_a_blocking_run_pumps_widget_messages_run_after_it_in_order() -> None:
    """A blocking ``process()`` hands the kernel's widget messages to their handlers while it
    runs and holds the rest: cells queued meanwhile (as JupyterLab sends them) run after it,
    in the order sent, each once."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        kc.execute_interactive(SETUP, timeout=120)
        slow = ("import time\nt0 = time.monotonic()\n"
                "out = df.batch.process(fn, progress=False, max_concurrent_batches=1, "
                "items_per_batch=1, agents=1)\nprint('first', out.height)")
        ids = [kc.execute(slow)] + [kc.execute(f"print('queued', {i})") for i in range(3)]
        printed: list[str] = []
        replies = 0
        while replies < len(ids):
            msg = kc.get_iopub_msg(timeout=120)
            if msg["msg_type"] == "stream":
                printed.extend(msg["content"]["text"].split("\n"))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                    and msg["parent_header"].get("msg_id") in ids:
                replies += 1
        assert [x for x in printed if x] == ["first 50", "queued 0", "queued 1", "queued 2"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
