"""``dfbatch demo`` and ``dfbatch sim``: the commands that run locally, with no API key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from dfbatch.errors import DfbatchError

EXIT_FAILED_ROWS = 3
EXIT_INTERRUPTED = 130


@click.command()
@click.option("--rows", type=click.IntRange(min=1), envvar="DFBATCH_DEMO_ROWS",
              help="Rows to enrich (env DFBATCH_DEMO_ROWS; default: all with the simulator, "
                   "100 on a real endpoint).")
@click.option("--model", help="Model (default: sim-chat, or gpt-4o-mini on a real endpoint).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="demo_out",
              show_default=True, help="Where result.parquet and timeline.png go.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show the progress display.")
@click.option("--batch-api", is_flag=True,
              help="Send the rows as Batch API jobs to the simulator, after the plan's price "
                   "comparison (synchronous vs batch).")
def demo(rows: int | None, model: str | None, out_dir: Path, progress: bool,
         batch_api: bool) -> None:
    """Enrich the stdlib-docs dataset with an LLM: the local simulator, or OPENAI_API_KEY /
    OPENAI_BASE_URL's endpoint when set."""
    import warnings

    from dfbatch.demo import run_batch_demo, run_demo
    from dfbatch.errors import PartialResultWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartialResultWarning)  # the report says it
        try:
            report: Any
            if batch_api:
                report = run_batch_demo(rows=rows, out_dir=out_dir,
                                        progress="auto" if progress else False)
            else:
                report = run_demo(rows=rows, model=model, out_dir=out_dir,
                                  progress="auto" if progress else False)
        except (DfbatchError, FileNotFoundError, ImportError) as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:  # before the run started, or a second Ctrl-C
            click.echo("stopped by Ctrl-C; no result was written", err=True)
            sys.exit(EXIT_INTERRUPTED)
    click.echo(str(report))
    if report.rows_cancelled:
        click.echo(f"stopped by Ctrl-C: {report.rows - report.rows_cancelled:,} of "
                   f"{report.rows:,} rows done, {report.rows_cancelled:,} cancelled", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if report.rows_failed:
        sys.exit(EXIT_FAILED_ROWS)


# -- sim -----------------------------------------------------------------------------------
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="0 picks a free port.")
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Requests per minute before 429s.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), default=200_000.0,
              show_default=True, help="Tokens per minute before 429s.")
@click.option("--no-limits", is_flag=True, help="Serve without RPM / TPM limits.")
@click.option("--latency", "ttft_s", type=click.FloatRange(min=0), default=0.25,
              show_default=True, help="Seconds to the first token.")
@click.option("--per-token", "per_token_s", type=click.FloatRange(min=0), default=0.01,
              show_default=True, help="Seconds per output token.")
@click.option("--tail-prob", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Share of calls with a heavy-tailed extra delay.")
@click.option("--fault-rate", "error_rate", type=click.FloatRange(0, 1), default=0.0,
              show_default=True, help="Share of calls answered with HTTP 500.")
@click.option("--hang-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of calls that hang.")
@click.option("--reset-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of calls whose connection is reset.")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Multiply every simulated duration (0.1 = 10x faster).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", envvar="DFBATCH_SIM_API_KEY",
              help="Require this key (env DFBATCH_SIM_API_KEY); default: accept any.")
@click.option("--batch-time", "batch_completion_s", type=click.FloatRange(min=0, min_open=True),
              default=600.0, show_default=True,
              help="Simulated seconds a Batch API job takes (/v1/batches).")
def sim(host: str, port: int, no_limits: bool, **options: Any) -> None:
    """Serve the local OpenAI-compatible SIMULATOR (/v1/chat/completions, /v1/embeddings,
    /v1/models) until Ctrl-C. Answers are deterministic stand-ins, not a language model."""
    import asyncio

    from dfbatch.sim import serve

    if no_limits:
        options.update(rpm=None, tpm=None)
    try:
        server = serve(port, host=host, **options)
    except DfbatchError as exc:
        raise click.UsageError(str(exc)) from None

    async def forever() -> None:
        async with server as url:
            click.echo(f"dfbatch simulator at {url} (rpm={server.config.rpm}, "
                       f"tpm={server.config.tpm}); stats at {url}/sim/stats; Ctrl-C stops",
                       err=True)
            click.echo(f"use it: chat('sim-chat', ..., base_url='{url}') in Python, or "
                       f"export OPENAI_BASE_URL={url} (any OPENAI_API_KEY works), or "
                       f"dfbatch run DATA --model sim-chat --base-url {url} --out out.parquet",
                       err=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(forever())
    except OSError as exc:
        msg = f"cannot listen on {host}:{port}: {exc}"
        raise click.ClickException(msg) from None
    except KeyboardInterrupt:
        snap = server.stats.snapshot()
        click.echo(f"served {snap.requests:,} requests ({snap.rate_limited:,} x 429)", err=True)
