"""The dashboard in a real browser: JupyterLab in headless chromium runs a notebook.

Needs Debian ``chromium`` (``/usr/bin/chromium``, or ``$CHROMIUM``), ``node`` and
``npm install`` in ``tests/browser`` (playwright-core); skipped with the reason otherwise.
``.ci/run`` installs them, so CI always runs it. The screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CELLS = [
    """\
import asyncio, polars as pl, dfbatch
from dfbatch import FatalError, RetryableError
df = pl.DataFrame({"text": [f"review {i}: " + "good " * (i % 7) for i in range(96)]})
seen = set()

async def summarize(batch):  # ~4 s in all; some 429s and one poison row
    await asyncio.sleep(0.5)
    texts = batch["text"].to_list()
    if any(t.startswith("review 13:") for t in texts):
        raise FatalError("poison row")
    key = texts[0]
    if hash(key) % 5 == 0 and key not in seen:
        seen.add(key)
        raise RetryableError("429 rate limited", retry_after=0.2)
    return batch["text"].str.to_uppercase()""",
    """\
out = df.batch.process(summarize, progress="widget", agents=4, max_concurrent_batches=2,
                       items_per_batch=2, adaptive=False, backoff_base=0.1)""",
    "out.batch.plot_timeline()",
]


def missing_tools() -> str | None:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if shutil.which("node") is None:
        return "node not found (apt-get install nodejs npm)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"playwright-core missing: run `npm install` in {BROWSER_DIR}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server on a free port, serving tmp_path; yields (url, token, root)."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "root"
    root.mkdir()
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = (tmp_path / "lab.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/api/status?token={token}", proc, tmp_path / "lab.log")
        yield url, token, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer in {timeout} s: {log.read_text()[-2000:]}")


def run_in_lab(
    lab: tuple[str, str, Path], name: str, cells: list[str], shot: Path, *args: str
) -> dict[str, Any]:
    """Run ``cells`` as notebook ``name`` in the lab, in chromium (``run_notebook.mjs``, with
    ``args`` added); screenshots go to ``shot``'s folder. The page's result, as a dict."""
    url, token, root = lab
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / name)
    node = subprocess.run(
        ["node", str(BROWSER_DIR / "run_notebook.mjs"), "--url", url, "--token", token,
         "--notebook", name, "--screenshot", str(shot), "--timeout", "180",
         "--chromium", CHROMIUM, *args],
        capture_output=True, text=True, timeout=300, cwd=BROWSER_DIR,
    )
    lines = [x for x in node.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no result from the browser script: {node.stdout}\n{node.stderr}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_dashboard_reaches_100_percent_in_jupyterlab(
    lab: tuple[str, str, Path], tmp_path: Path
) -> None:
    shot = tmp_path / "dashboard.png"
    page = run_in_lab(lab, "dashboard.ipynb", CELLS, shot)
    assert page["ok"], page.get("error")
    assert page["progress"] == "100%"
    assert "progress-bar-warning" in page["barClass"]  # done, with one failed row
    assert page["barWidth"] == "100%"
    assert len(page["live"]) >= 2, f"the bar did not move while running: {page['live']}"
    width, height = page["image"]
    assert width > 600 and height > 150  # the live figure, as PNG
    assert page["plot"] and page["plot"][0] > 300  # out.batch.plot_timeline()
    assert "96 / 96" in page["header"] and "done" in page["header"]
    assert "1 failed rows" in page["header"]
    assert not page["errors"], page["errors"]
    assert shot.stat().st_size > 10_000
    assert shot.with_name("dashboard-dashboard.png").exists()
