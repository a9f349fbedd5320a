"""``dfbatch jobs`` (the provider's Batch API jobs) and ``dfbatch cache`` (the response cache):
command groups the ``dfbatch`` command adds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click


# -- jobs ----------------------------------------------------------------------------------
@click.group()
@click.option("--base-url", envvar="OPENAI_BASE_URL",
              help="OpenAI-compatible endpoint (env OPENAI_BASE_URL); key from OPENAI_API_KEY.")
@click.pass_context
def jobs(ctx: click.Context, base_url: str | None) -> None:
    """The provider's Batch API jobs (those `dfbatch run --batch-api` created, and others)."""
    try:
        from dfbatch.llm.client import import_openai

        openai = import_openai()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    key = os.environ.get("OPENAI_API_KEY") or ("sk-local-no-key-needed" if base_url else None)
    if key is None:
        msg = "set OPENAI_API_KEY, or pass --base-url for a local server (e.g. dfbatch sim)"
        raise click.UsageError(msg)
    ctx.obj = openai.OpenAI(base_url=base_url, api_key=key, max_retries=2)


@jobs.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_obj
def jobs_list(client: Any, limit: int) -> None:
    """One line per job, newest first: id, status, request counts, the dfbatch file."""
    from dfbatch.llm.batch_jobs import job_rows

    for r in job_rows(client, limit):
        click.echo(f"{r['id']}  {r['status']:<11} {r['completed']}/{r['total']} done, "
                   f"{r['failed']} failed  {r['endpoint']}  {r['dfbatch'] or ''}".rstrip())


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_obj
def jobs_cancel(client: Any, job_id: str) -> None:
    """Cancel JOB_ID; its unanswered rows come back marked, and a rerun resubmits them."""
    job = client.batches.cancel(job_id)
    click.echo(f"{job.id}: {job.status}")


@jobs.command("collect")
@click.argument("job_id")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Result file: .parquet, .csv or .ndjson (one row per answer, or per input "
                   "row with --data); .jsonl writes the provider's raw lines.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="The input file the job was made from: its rows get output and error.")
@click.option("--key", help="With --data: the id column the run used as key=.")
@click.pass_obj
def jobs_collect(client: Any, job_id: str, out: Path, data: Path | None,
                 key: str | None) -> None:
    """Write the answers of JOB_ID to --out.

    \b
    Without --data: one row per answer: custom_id, row (the input row's position, or its
    --key value), output (chat text or embedding), error, input_tokens, output_tokens.
    With --data IN: the rows of IN with output and error added (matched by position, or
    by --key); rows the job has no answer for get an error saying so.
    A .jsonl --out keeps the provider's output and error lines as they are. A job still
    running has no answers yet: its rows come back with the error.
    """
    from dfbatch.cli._io import OUTPUTS, read_frame, write_frame
    from dfbatch.errors import DfbatchError
    from dfbatch.llm.batch_jobs import answers_frame, collect_job, on_rows

    suffix = out.suffix.lower()
    if suffix not in OUTPUTS:
        msg = f"--out {out.name!r}: use a .parquet, .csv or .ndjson file (.jsonl: raw lines)"
        raise click.UsageError(msg)
    if key is not None and data is None:
        msg = "--key needs --data (the input whose rows the answers go back to)"
        raise click.UsageError(msg)
    if suffix == ".jsonl" and data is not None:
        msg = "--data puts answers on rows: write them to .parquet, .csv or .ndjson"
        raise click.UsageError(msg)
    frame = read_frame(data).collect() if data is not None else None
    job, lines = collect_job(client, job_id)
    if suffix == ".jsonl":
        out.write_bytes(lines)
        n_lines = lines.count(b"\n")
        click.echo(f"{job.id}: {job.status}; wrote {n_lines:,} lines to {out}")
        return
    answers = answers_frame(lines)
    result = answers
    if frame is not None:
        try:
            result = on_rows(frame, answers, job.id, key)
        except DfbatchError as exc:
            raise click.UsageError(str(exc)) from None
    write_frame(result, out)
    failed = int(result["error"].is_not_null().sum())
    click.echo(f"{job.id}: {job.status}; wrote {result.height:,} rows to {out} "
               f"({result.height - failed:,} answered, {failed:,} with an error)")


# -- the response cache ----------------------------------------------------------------------
@click.group()
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path), envvar="DFBATCH_CACHE",
              help="The cache file (default: the user cache directory's responses.sqlite).")
@click.pass_context
def cache(ctx: click.Context, path: Path | None) -> None:
    """Inspect or shrink the response cache that process(..., cache=True) uses."""
    from dfbatch.persist._cache import Cache

    ctx.obj = Cache(path)


@cache.command("info")
@click.pass_obj
def cache_info(store: Any) -> None:
    """Print the cache's path, entries and sizes as JSON."""
    click.echo(json.dumps(store.info(), indent=2))


@cache.command("clear")
@click.confirmation_option(prompt="Delete every cached answer?")
@click.pass_obj
def cache_clear(store: Any) -> None:
    """Delete every entry."""
    click.echo(f"deleted {store.clear():,} entries from {store.path}")


@cache.command("prune")
@click.option("--max-size", type=click.IntRange(min=1), help="Keep at most this many bytes.")
@click.option("--older-than-days", type=click.FloatRange(min=0),
              help="Delete entries not used for this many days.")
@click.pass_obj
def cache_prune(store: Any, max_size: int | None, older_than_days: float | None) -> None:
    """Evict the least recently used entries (down to --max-size) and stale ones."""
    age = None if older_than_days is None else older_than_days * 86_400
    gone = store.prune(max_size=max_size, older_than_s=age)
    click.echo(f"deleted {gone:,} entries; {store.info()['size']:,} bytes of answers kept")
