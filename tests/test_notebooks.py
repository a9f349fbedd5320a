"""Every notebook in notebooks/ runs clean in a real kernel (nbclient) against the simulator."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MAX_STORED_OUTPUT_BYTES = 20_000


def _names() -> list[str]:
    return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_the_three_notebooks_exist_and_are_stored_without_large_outputs():
    assert {"quickstart.ipynb", "enrich_dataset.ipynb", "agent_load.ipynb"} <= set(_names())
    for name in _names():
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        stored = sum(len(str(cell.get("outputs", ""))) for cell in nb.cells)
        assert stored < MAX_STORED_OUTPUT_BYTES, f"{name}: clear its outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_notebook_runs_clean(name, monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)  # the kernel inherits it: stay on the simulator
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=180,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
