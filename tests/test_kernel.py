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
