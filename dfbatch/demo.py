"""The main job, end to end: enrich every row of a real dataset with an LLM, over HTTP.

``run_demo()`` (``make demo`` / ``python -m dfbatch demo``) builds ``datasets/pydocs.parquet``
(the standard library's docstrings) if it is missing, starts the local simulated endpoint
(``dfbatch.sim``), asks the model for a summary and keywords of every document through
``dfbatch.llm.chat`` (structured output: a struct column; batch mode: one request per batch of
4 documents) with ``dfbatch.process`` and its progress display, writes
``demo_out/result.parquet`` and ``demo_out/timeline.png``, and prints a summary.

With ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` set, the same code talks to that endpoint instead
(``model``, default ``gpt-4o-mini``); since that costs money, it then enriches only the first
``REAL_DEFAULT_ROWS`` rows unless ``rows`` says otherwise, and rate limits are learned from the
endpoint's ``x-ratelimit-*`` headers.

Sizing (``DEMO_SIM``, ``RUN_SETTINGS``): the whole dataset (~6,500 rows, ~1,650 requests)
finishes in about a minute on 2 cores (measured: 61 s run, 72 s with startup, on a loaded
2-core machine). The simulator allows 12,000 RPM / 4M TPM (the client is given the same
limits), answers in 0.3 s + 10 ms per output token (about 2.3 s per 4-document batch), 2% of
calls 2-6x slower, 0.5% injected 500s so the summary shows real retries. Up to 128 batches are
in flight (an API serves many calls at once; the per-core default of 16 would leave the run
latency-bound at about 2.5 minutes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from dfbatch.config import Progress

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "pydocs.parquet"
REAL_DEFAULT_ROWS = 100
SIM_MODEL = "sim-chat"
REAL_MODEL = "gpt-4o-mini"
PROMPT = "Summarize this Python documentation and list its keywords:\n{module}.{name}: {doc}"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "description": "one sentence"},
        "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["summary", "keywords"],
}
MAX_TOKENS = 160
NEXT_STEP = (
    "next: open the notebooks with `.venv/bin/jupyter lab notebooks/` (quickstart.ipynb first),\n"
    "      or run your own data: `.venv/bin/dfbatch run data.parquet --text doc --model sim-chat "
    "--base-url URL --out out.parquet`\n"
    "      (`.venv/bin/dfbatch sim` serves URL; `source .venv/bin/activate` puts dfbatch on PATH)"
)
RUN_SETTINGS: dict[str, Any] = {  # an API serves many calls at once: allow 128 in flight
    "max_in_flight": 128,
    "max_concurrent_batches": 32,
    "timeout": 60.0,
}
_PLAN = {k: v for k, v in RUN_SETTINGS.items() if k in ("items_per_batch", "agents")}
DEMO_SIM: dict[str, Any] = {
    "rpm": 12_000,
    "tpm": 4_000_000,
    "ttft_s": 0.3,
    "per_token_s": 0.01,
    "tail_prob": 0.02,
    "tail_factor": 2.0,
    "tail_cap": 6.0,
    "error_rate": 0.005,
    "seed": 0,
}


@dataclass(frozen=True)
class DemoReport:
    """What the demo did; ``str()`` is the printed summary."""

    endpoint: str
    model: str
    rows: int
    rows_ok: int
    rows_failed: int
    input_tokens: int
    output_tokens: int
    calls: int
    retries: int
    rate_limited: int
    elapsed_s: float
    result_path: Path
    timeline_path: Path | None
    server: str = ""
    rows_cancelled: int = 0  # left unfinished by Ctrl-C (not failed: a rerun would do them)
    est_input_tokens: int = 0  # what summary(fn=...) estimated before the run
    est_output_tokens: int = 0  # the output cap (max_tokens per row)

    @property
    def rows_per_s(self) -> float:
        done = self.rows - self.rows_cancelled
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        stopped = f" / cancelled {self.rows_cancelled:,} (stopped)" if self.rows_cancelled else ""
        lines = [
            f"dfbatch demo: {self.rows:,} rows through {self.model} at {self.endpoint}",
            f"  rows ok {self.rows_ok:,} / failed {self.rows_failed:,}{stopped}",
            f"  tokens {self.input_tokens:,} in + {self.output_tokens:,} out (estimated before "
            f"the run: {self.est_input_tokens:,} in + up to {self.est_output_tokens:,} out)",
            f"  calls {self.calls:,}, retries {self.retries:,} "
            f"({self.rate_limited:,} rate-limited)",
            f"  elapsed {self.elapsed_s:.1f} s, {self.rows_per_s:,.1f} rows/s",
        ]
        if self.server:
            lines.append(f"  {self.server}")
        wrote = [str(self.result_path)] + ([str(self.timeline_path)] if self.timeline_path else [])
        lines.append(f"  wrote {', '.join(wrote)}")
        lines.append(NEXT_STEP)
        return "\n".join(lines)


def load_dataset(path: Path = DATASET) -> pl.DataFrame:
    """The pydocs dataset, built first if missing (needs a source checkout with datasets/)."""
    if not path.exists():
        builder = path.parent / "build_pydocs.py"
        if not builder.exists():
            msg = (
                f"{path} is missing and its builder {builder} is not there; run the demo from a "
                "source checkout of dfbatch (git clone ...; make demo)"
            )
            raise FileNotFoundError(msg)
        spec = importlib.util.spec_from_file_location("_dfbatch_build_pydocs", builder)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"building {path} from this Python's standard library docs ...", flush=True)
        module.build(path)
    return pl.read_parquet(path)


def real_endpoint() -> bool:
    """True when the environment points at a real endpoint (a key or a base URL is set)."""
    return bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"))


def run_demo(
    rows: int | None = None,
    model: str | None = None,
    out_dir: str | os.PathLike[str] = "demo_out",
    progress: Progress = "auto",
) -> DemoReport:
    """Enrich the pydocs dataset with an LLM and write the result; see the module docstring.

    Parameters
    ----------
    rows
        Rows to enrich (default: all with the simulator, ``REAL_DEFAULT_ROWS`` on a real API).
    model
        Model name (default ``sim-chat`` on the simulator, ``gpt-4o-mini`` on a real API).
    out_dir
        Where ``result.parquet`` and ``timeline.png`` go.
    progress
        As for ``dfbatch.process``: ``"auto"``, ``"bar"``, ``"widget"`` or ``False``.
    """
    df = load_dataset()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if real_endpoint():
        df = df.head(REAL_DEFAULT_ROWS if rows is None else rows)
        return _enrich(df, model or REAL_MODEL, None, out, progress, limits={})
    from dfbatch.sim import serve

    df = df if rows is None else df.head(rows)
    server = serve(**DEMO_SIM)
    # Ctrl-C drops the calls in flight: the simulator would log each dropped connection
    quiet = logging.getLogger("aiohttp.server")
    with contextlib.ExitStack() as restore, server as url:
        restore.callback(quiet.setLevel, quiet.level)
        quiet.setLevel(logging.CRITICAL)
        limits = {"rpm": server.config.real_rpm, "tpm": server.config.real_tpm}
        report = _enrich(df, model or SIM_MODEL, url, out, progress, limits=limits)
    snap = server.stats.snapshot()
    note = (
        f"simulator (not a real model) served {snap.requests:,} requests: "
        f"{snap.rate_limited:,} x 429, {snap.server_errors:,} x 5xx, "
        f"peak {snap.max_in_flight} in flight"
    )
    return _replace(report, server=note)


def _enrich(
    df: pl.DataFrame,
    model: str,
    base_url: str | None,
    out: Path,
    progress: Progress,
    limits: dict[str, Any],
) -> DemoReport:
    import dfbatch
    from dfbatch.events import StatsAccumulator
    from dfbatch.llm import chat

    fn = chat(
        model,
        PROMPT,
        response_format=SCHEMA,
        max_tokens=MAX_TOKENS,
        mode="batch",
        base_url=base_url,
    )
    estimate = dfbatch.summary(dfbatch.plan(df, "doc", fn=fn, **_PLAN), fn=fn, **_PLAN)
    acc = StatsAccumulator()
    t0 = time.perf_counter()
    result = dfbatch.process(
        df, fn, "doc", progress=progress, on_event=acc.apply, **RUN_SETTINGS, **limits
    )
    elapsed = time.perf_counter() - t0
    stats = acc.snapshot()
    result_path = out / "result.parquet"
    result.write_parquet(result_path)
    timeline = _timeline(result, out / "timeline.png")
    cancelled = int((result["error"] == "cancelled").sum())
    failed = int(result["error"].is_not_null().sum()) - cancelled
    return DemoReport(
        endpoint=base_url or os.environ.get("OPENAI_BASE_URL") or "api.openai.com",
        model=model,
        rows=result.height,
        rows_ok=result.height - failed - cancelled,
        rows_failed=failed,
        input_tokens=stats.input_tokens,
        output_tokens=stats.output_tokens,
        calls=stats.calls,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        elapsed_s=elapsed,
        result_path=result_path,
        timeline_path=timeline,
        rows_cancelled=cancelled,
        est_input_tokens=estimate.tokens_in,
        est_output_tokens=estimate.tokens_out,
    )


def _timeline(result: pl.DataFrame, path: Path) -> Path | None:
    from dfbatch.display.plots import plot_timeline  # what result.batch.plot_timeline() calls

    fig = plot_timeline(result)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _replace(report: DemoReport, **changes: Any) -> DemoReport:
    import dataclasses

    return dataclasses.replace(report, **changes)


# -- the same enrichment through the provider's Batch API (``dfbatch demo --batch-api``) --------
BATCH_SIM: dict[str, Any] = {"time_scale": 0.001, "batch_completion_s": 3_600.0, "seed": 0}
PRICES_PER_1K = (0.00015, 0.0006)  # gpt-4o-mini, USD per 1,000 input / output tokens
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class BatchDemoReport:
    """What the Batch API demo did; ``str()`` is the printed summary (the plan's cost first)."""

    plan: str
    rows: int
    rows_ok: int
    rows_failed: int
    jobs: int
    elapsed_s: float
    result_path: Path
    rows_cancelled: int = 0  # a stop left them in jobs still running, or not submitted

    def __str__(self) -> str:
        return "\n".join([
            self.plan,
            f"dfbatch demo (Batch API, simulator): {self.rows:,} rows in {self.jobs} job(s): "
            f"ok {self.rows_ok:,} / failed {self.rows_failed:,}, {self.elapsed_s:.1f} s "
            "(an hour of simulated batch time)",
            f"  wrote {self.result_path}",
        ])


def run_batch_demo(
    rows: int | None = None, out_dir: str | os.PathLike[str] = "demo_out",
    progress: Progress = "auto",
) -> BatchDemoReport:
    """The demo's enrichment as Batch API jobs on the simulator, with the plan's cost comparison
    (synchronous vs batch price). Only the simulator: a real job may take up to 24 hours (use
    ``dfbatch run --batch-api`` for that)."""
    import dfbatch
    from dfbatch.llm import chat
    from dfbatch.sim import serve

    df = load_dataset()
    df = df if rows is None else df.head(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planned = dfbatch.plan(df, "doc", items_per_batch=1, output_tokens_per_row=MAX_TOKENS)
    summary = dfbatch.summary(planned, price_in_per_1k=PRICES_PER_1K[0],
                              price_out_per_1k=PRICES_PER_1K[1], batch_discount=BATCH_DISCOUNT,
                              items_per_batch=1, output_tokens_per_row=MAX_TOKENS)
    server = serve(**BATCH_SIM)
    t0 = time.perf_counter()
    with server as url:
        fn = chat(SIM_MODEL, PROMPT, response_format=SCHEMA, max_tokens=MAX_TOKENS,
                  base_url=url, api="batch")
        fn.dfbatch_price = PRICES_PER_1K  # type: ignore[attr-defined]  # the dashboard's saving
        result = dfbatch.process(df, fn, "doc", progress=progress,
                                 checkpoint=out / "batch_checkpoint", resume="overwrite")
        from dfbatch.llm.client import import_openai

        jobs = len(list(import_openai().OpenAI(base_url=url, api_key="x").batches.list()))
    result_path = out / "result_batch_api.parquet"
    result.write_parquet(result_path)
    from dfbatch.run._batch_api import _NOT_SENT, _STILL_RUNNING

    waiting = int(result["error"].is_in([_STILL_RUNNING, _NOT_SENT]).sum())
    failed = int(result["error"].is_not_null().sum()) - waiting
    return BatchDemoReport(str(summary), result.height, result.height - failed - waiting,
                           failed, jobs, time.perf_counter() - t0, result_path, waiting)
