"""Reading the input file and writing the result file of ``dfbatch`` commands."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click
import polars as pl

from dfbatch.errors import did_you_mean

_READERS: dict[str, Callable[[Path], pl.LazyFrame]] = {
    ".parquet": pl.scan_parquet,
    ".pq": pl.scan_parquet,
    ".csv": pl.scan_csv,
    ".tsv": lambda p: pl.scan_csv(p, separator="\t"),
    ".ndjson": pl.scan_ndjson,
    ".jsonl": pl.scan_ndjson,
}
OUTPUTS = (".parquet", ".pq", ".csv", ".ndjson", ".jsonl")


def read_frame(path: Path) -> pl.LazyFrame:
    """A LazyFrame over ``path`` (Parquet, CSV/TSV, NDJSON by extension), or a usage error."""
    if not path.is_file():
        near = did_you_mean(path.name, os.listdir(path.parent)) if path.parent.is_dir() else ""
        what = "is a directory" if path.is_dir() else "not found"
        msg = f"input file {str(path)!r} {what}.{near}"
        raise click.UsageError(msg)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        kinds = ", ".join(sorted(_READERS))
        msg = f"cannot read {path.name!r}: use one of {kinds}"
        raise click.UsageError(msg)
    lf = reader(path)
    try:
        lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        msg = f"cannot read {str(path)!r}: {exc}"
        raise click.UsageError(msg) from None
    return lf


def write_frame(df: pl.DataFrame, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df.write_parquet(path)
        return
    nested = [n for n, t in df.schema.items() if t.is_nested() or t == pl.Object]
    if nested and suffix == ".csv":  # CSV holds no lists/structs: write them as JSON text
        df = df.with_columns(pl.col(nested).map_elements(
            lambda v: json.dumps(v.to_list() if isinstance(v, pl.Series) else v, default=str),
            return_dtype=pl.String))
    if suffix == ".csv":
        df.write_csv(path)
    else:
        df.write_ndjson(path)
