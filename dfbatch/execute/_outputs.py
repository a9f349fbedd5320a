"""Turn what fn returned for one batch into an output frame plus per-row error values.

fn returns one output per row, in order: a list (``RowError`` items fail single rows), a
``pl.Series`` (one output column) or a ``pl.DataFrame`` (several output columns).

Examples
--------
>>> import polars as pl
>>> from dfbatch.errors import RowError
>>> frame, errors = normalize(["a", RowError("bad"), "c"], 3, "output", reserved=set())
>>> frame["output"].to_list(), errors
(['a', None, 'c'], [None, 'RowError: bad', None])
>>> normalize(["a"], 2, "output", reserved=set())
Traceback (most recent call last):
...
dfbatch.errors.OutputError: fn returned 1 outputs for a batch of 2 rows; return exactly one ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from dfbatch.errors import OutputError


def normalize(
    value: Any, n_rows: int, name: str, *, reserved: set[str]
) -> tuple[pl.DataFrame, list[str | None] | None]:
    """Validate fn's return value for a batch of ``n_rows`` rows.

    Returns the output frame (``n_rows`` rows) and the per-row error texts (None when no row
    failed). Raises ``OutputError`` with a message that says what fn should return.
    """
    errors: list[str | None] | None = None
    if isinstance(value, pl.DataFrame):
        frame = value
        clash = sorted(set(frame.columns) & reserved)
        if clash:
            msg = (
                f"fn returned column(s) {clash} that already exist in the input or result; "
                "rename them in fn (e.g. df.rename({...}))"
            )
            raise OutputError(msg)
    elif isinstance(value, pl.Series):
        frame = value.rename(name).to_frame()
    elif isinstance(value, np.ndarray):
        frame = pl.Series(name, value).to_frame()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values, errors = _split_errors(value)
        try:
            frame = pl.Series(name, values, strict=False).to_frame()
        except Exception as exc:
            msg = f"fn returned values polars cannot put in one column ({exc}); return one type"
            raise OutputError(msg) from None
    else:
        msg = (
            "fn must return one output per row: a list, a pl.Series or a pl.DataFrame, "
            f"got {type(value).__name__}"
        )
        raise OutputError(msg)
    if frame.height != n_rows:
        msg = (
            f"fn returned {frame.height} outputs for a batch of {n_rows} rows; "
            "return exactly one output per row, in order"
        )
        raise OutputError(msg)
    return frame, errors


def _split_errors(values: Sequence[Any]) -> tuple[list[Any], list[str | None] | None]:
    if not any(isinstance(v, BaseException) for v in values):
        return list(values), None
    from dfbatch.execute._retry import describe

    out = [None if isinstance(v, BaseException) else v for v in values]
    errs = [describe(v) if isinstance(v, BaseException) else None for v in values]
    return out, errs
