"""The ``dfbatch`` command line (also ``python -m dfbatch``).

``dfbatch plan data.parquet --text doc`` prints the plan summary; ``dfbatch run data.parquet
--text doc --fn mypkg.fns:summarize --out out.parquet`` runs ``fn`` over the rows (or the built-in
chat adapter with ``--model``) and writes the result. Inputs and outputs are Parquet, CSV or
NDJSON, chosen by extension. Exit codes: 0 every row ok, 3 some rows failed (the output is still
written; see its ``error`` column), 130 stopped by Ctrl-C (the partial output is written), 2 a
usage error (bad path, unknown column, bad ``--fn``), reported on stderr with a hint.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import polars as pl

from dfbatch.cli._groups import cache, jobs
from dfbatch.cli._io import OUTPUTS, read_frame, write_frame
from dfbatch.cli._local import EXIT_FAILED_ROWS, EXIT_INTERRUPTED, demo, sim
from dfbatch.errors import DfbatchError, did_you_mean


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dfbatch")
def main() -> None:
    """Push a table of texts through an expensive, rate-limited function in token-aware batches."""


# -- shared options and helpers ------------------------------------------------------------
def _plan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("data", type=click.Path(dir_okay=False, path_type=Path)),
        click.option("--text", default="text", show_default=True,
                     help="Column holding the text to count tokens of."),
        click.option("--items-per-batch", type=click.IntRange(min=1), help="Rows per batch (4)."),
        click.option("--token-limit", type=click.IntRange(min=1),
                     help="Request tokens per batch (32768)."),
        click.option("--agents", type=click.IntRange(min=1),
                     help="Agents (default: 2 per CPU core)."),
        click.option("--encoding", help="tiktoken encoding or model name (cl100k_base)."),
        click.option("--output-tokens", "output_tokens_per_row", type=click.IntRange(min=0),
                     help="Expected output tokens per row (charged against --tpm)."),
        click.option("--overhead-tokens", "request_overhead_tokens",
                     type=click.IntRange(min=0), help="Prompt tokens sent once per request."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", help="Use the built-in chat adapter with this model (no --fn)."),
        click.option("--prompt", help="Prompt template for --model (default: the text column)."),
        click.option("--system", help="System message for --model."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Output cap per row for --model."),
        click.option("--mode", type=click.Choice(["per_row", "batch"]), default="per_row",
                     show_default=True, help="--model: one request per row, or per batch."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _settings(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _require_column(lf: pl.LazyFrame, name: str, option: str) -> None:
    columns = lf.collect_schema().names()
    if name not in columns:
        hint = did_you_mean(name, columns) or f" Columns: {columns[:20]}"
        msg = f"{option} {name!r}: no such column.{hint}"
        raise click.UsageError(msg)


def load_fn(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (``module:Class.attr`` works too), or a usage error."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        msg = f"--fn {spec!r}: expected module:function, e.g. mypkg.fns:summarize"
        raise click.UsageError(msg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        msg = (
            f"--fn {spec!r}: module {module_name!r} not found ({exc}). Hint: run from the "
            "directory that holds it, set PYTHONPATH, or pip install its package"
        )
        raise click.UsageError(msg) from None
    except Exception as exc:
        msg = f"--fn {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        raise click.UsageError(msg) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = did_you_mean(part, names)
            msg = f"--fn {spec!r}: {module_name!r} has no attribute {part!r}.{hint}"
            raise click.UsageError(msg)
        obj = getattr(obj, part)
    if not callable(obj):
        msg = f"--fn {spec!r} is a {type(obj).__name__}, not a function"
        raise click.UsageError(msg)
    return obj  # type: ignore[no-any-return]


# -- plan ----------------------------------------------------------------------------------
@main.command()
@_plan_options
@click.option("--price-in", type=click.FloatRange(min=0), help="USD per 1,000 input tokens.")
@click.option("--price-out", type=click.FloatRange(min=0), help="USD per 1,000 output tokens.")
@click.option("--batch-discount", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Show the Batch API's price beside the synchronous one (0.5 = half price).")
@_model_options
def plan(data: Path, text: str, price_in: float | None, price_out: float | None,
         batch_discount: float | None, model: str | None, prompt: str | None,
         system: str | None, max_tokens: int, mode: str, **options: Any) -> None:
    """Print how DATA would be batched: rows, batches, tokens, agent balance, cost.

    With --model (and --prompt, --system, --max-tokens, --mode as for `run`) the cost prices
    what `run` sends: the prompt template, the system message and the output cap."""
    import dfbatch

    lf = read_frame(data)
    _require_column(lf, text, "--text")
    settings = _settings(**options)
    fn = None
    if model is not None:  # only counted, never called: no key or endpoint needed
        fn = _chat(model, prompt or f"{{{text}}}", system, max_tokens, "http://127.0.0.1:9",
                   mode)
    try:
        planned = dfbatch.plan(lf.collect(), text, fn=fn, **settings)
        summary = dfbatch.summary(planned, fn=fn, price_in_per_1k=price_in,
                                  price_out_per_1k=price_out, batch_discount=batch_discount,
                                  **settings)
    except DfbatchError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(str(summary))
    with pl.Config(tbl_rows=32, tbl_hide_dataframe_shape=True):
        click.echo(summary.loads)


# -- run -----------------------------------------------------------------------------------
@main.command()
@_plan_options
@click.option("--fn", "fn_spec", metavar="MODULE:FUNCTION",
              help="Your fn(batch) -> outputs, e.g. mypkg.fns:summarize.")
@_model_options
@click.option("--base-url", envvar="OPENAI_BASE_URL",
              help="OpenAI-compatible endpoint for --model (env OPENAI_BASE_URL); the key is "
                   "read from OPENAI_API_KEY.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .parquet (streamed in chunks), .csv or .ndjson.")
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="Requests per minute.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), help="Tokens per minute.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds per call (600).")
@click.option("--max-attempts", type=click.IntRange(min=1), help="Calls per batch (5).")
@click.option("--max-in-flight", type=click.IntRange(min=1),
              help="Global cap on batches in flight (16 per core).")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path),
              help="Journal finished batches here; rerun to resume.")
@click.option("--resume", type=click.Choice(["auto", "overwrite"]), default="auto",
              show_default=True, help="overwrite: discard a checkpoint of another run.")
@click.option("--retry-errors", is_flag=True, help="With --checkpoint: rerun rows that failed.")
@click.option("--key", help="With --checkpoint: a unique id column that identifies rows.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Rows per chunk when streaming to .parquet.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--batch-api", is_flag=True,
              help="With --model: send the rows as the provider's Batch API jobs (half price, "
                   "answered within 24 h; rerun to collect after a stop). See `dfbatch jobs`.")
@click.option("--enqueued-tokens", type=click.IntRange(min=1),
              help="With --batch-api: the model's enqueued-token limit (your account's batch "
                   "queue limit); the jobs in flight at once stay within it.")
def run(data: Path, text: str, fn_spec: str | None, model: str | None, prompt: str | None,
        system: str | None, max_tokens: int, mode: str, base_url: str | None, out: Path,
        checkpoint: Path | None, resume: str, retry_errors: bool, key: str | None,
        chunk_rows: int, progress: bool | None, batch_api: bool, enqueued_tokens: int | None,
        **options: Any) -> None:
    """Run a function over the rows of DATA in batches and write the result to --out."""
    import warnings

    import dfbatch
    from dfbatch.errors import PartialResultWarning

    if out.suffix.lower() not in OUTPUTS:
        msg = f"--out {out.name!r}: use a .parquet, .csv or .ndjson file"
        raise click.UsageError(msg)
    if not out.parent.is_dir():
        msg = f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist"
        raise click.UsageError(msg)
    if out.exists() and out.resolve() == data.resolve():
        msg = f"--out {str(out)!r} is the input file; write the result to another file"
        raise click.UsageError(msg)
    lf = read_frame(data)
    _require_column(lf, text, "--text")
    if key is not None:
        _require_column(lf, key, "--key")
    if batch_api and model is None:
        msg = "--batch-api needs --model (the built-in chat adapter)"
        raise click.UsageError(msg)
    if enqueued_tokens is not None and not batch_api:
        msg = "--enqueued-tokens limits Batch API jobs: add --batch-api, or drop it"
        raise click.UsageError(msg)
    limits = None
    if enqueued_tokens is not None:
        from dfbatch.llm.batch_api import BatchLimits

        limits = BatchLimits(max_enqueued_tokens=enqueued_tokens)
    fn = _make_fn(fn_spec, model, prompt or f"{{{text}}}", system, max_tokens, base_url, mode,
                  api="batch" if batch_api else "sync", limits=limits)
    show: Any = "bar" if (sys.stderr.isatty() if progress is None else progress) else False
    common = dict(progress=show, checkpoint=checkpoint, resume=resume, key=key,
                  retry_errors=retry_errors, **_settings(**options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartialResultWarning)
        try:
            if out.suffix.lower() in (".parquet", ".pq") and not batch_api:
                s = dfbatch.process(lf, fn, text, out=out, chunk_rows=chunk_rows, **common)
                rows, ok = int(s["rows"].item()), int(s["rows_ok"].item())
                cancelled = int(s["rows_cancelled"].item())
            else:
                result = dfbatch.process(lf.collect(), fn, text, **common)
                write_frame(result, out)
                err = result["error"]
                rows, ok = result.height, int(err.is_null().sum())
                cancelled = int((err == "cancelled").sum())
        except DfbatchError as exc:
            raise click.UsageError(str(exc)) from None
    stopped = False
    for w in caught:
        if issubclass(w.category, PartialResultWarning):
            stopped = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    failed = rows - ok - cancelled
    click.echo(f"wrote {rows:,} rows to {out}: {ok:,} ok, {failed:,} failed"
               + (f", {cancelled:,} cancelled" if cancelled else "")
               + (" (see the error column)" if failed or cancelled else ""), err=True)
    if stopped:
        click.echo(_stopped_note(rows, cancelled, out, checkpoint), err=True)
        # do not wait at exit for calls still running in fn's threads: the output
        sys.stdout.flush()  # is written, and a sync fn's thread cannot be cancelled
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    if failed:
        sys.exit(EXIT_FAILED_ROWS)


def _stopped_note(rows: int, cancelled: int, out: Path, checkpoint: Path | None) -> str:
    """What a Ctrl-C left: rows done, rows not done, and the command that resumes."""
    done = rows - cancelled
    head = (f"stopped by Ctrl-C: {done:,} of {rows:,} rows done, {cancelled:,} not done "
            f"(error 'cancelled' in {out})")
    command = _command_line()
    if checkpoint is not None:
        return (f"{head}\nresume (the {done:,} done rows are not sent again):\n  {command}")
    return (f"{head}\nno --checkpoint, so a rerun sends every row again; to make the next run "
            f"resumable:\n  {command} --checkpoint {out.stem}_checkpoint")


def _command_line() -> str:
    """The command being run, rebuilt from its parameters (quoted for a shell)."""
    import shlex

    ctx = click.get_current_context()
    words = ["dfbatch", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif isinstance(param, click.Option) and value is not None and value != param.default:
            if param.is_flag:
                opts = param.opts if value else param.secondary_opts
                words.extend(opts[:1])
            else:
                words.extend([param.opts[0], str(value)])
    return shlex.join(words)


def _chat(model: str, prompt: str, system: str | None, max_tokens: int, base_url: str | None,
          mode: str, api: str = "sync", limits: Any = None) -> Callable[..., Any]:
    try:
        from dfbatch.llm import chat
    except ImportError as exc:
        msg = f"--model needs the llm extra: pip install 'dfbatch[llm]' ({exc})"
        raise click.UsageError(msg) from None
    try:
        return chat(model, prompt, system=system, max_tokens=max_tokens, base_url=base_url,
                    mode=mode, api=api, batch_limits=limits)  # type: ignore[arg-type]
    except DfbatchError as exc:
        raise click.UsageError(str(exc)) from None


def _make_fn(fn_spec: str | None, model: str | None, prompt: str, system: str | None,
             max_tokens: int, base_url: str | None, mode: str = "per_row",
             api: str = "sync", limits: Any = None) -> Callable[..., Any]:
    if fn_spec is not None and model is not None:
        msg = "pass either --fn or --model, not both"
        raise click.UsageError(msg)
    if fn_spec is not None:
        return load_fn(fn_spec)
    if model is None:
        msg = "pass --fn module:function, or --model NAME for the chat adapter"
        raise click.UsageError(msg)
    if base_url is None and not os.environ.get("OPENAI_API_KEY"):
        msg = (f"--model {model}: no API key; set OPENAI_API_KEY, or for a local "
               "OpenAI-compatible server (e.g. `dfbatch sim`) pass --base-url URL "
               "(or set OPENAI_BASE_URL)")
        raise click.UsageError(msg)
    return _chat(model, prompt, system, max_tokens, base_url, mode, api, limits)


# -- demo ----------------------------------------------------------------------------------


for command in (demo, sim, jobs, cache):
    main.add_command(command)
