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
    from dfbatch.llm.batch_api import job_rows

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
              help="Where the output and error lines go (JSONL).")
@click.pass_obj
def jobs_collect(client: Any, job_id: str, out: Path) -> None:
    """Download the answers of JOB_ID (output lines, then error lines) to --out. To put them
    back on their rows, rerun the `dfbatch run --batch-api` that created the job."""
    from dfbatch.llm.batch_api import collect_job

    job, data = collect_job(client, job_id)
    out.write_bytes(data)
    lines = data.count(b"\n")
    click.echo(f"{job.id}: {job.status}; wrote {lines:,} lines to {out}")

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
