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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# -- answers kept from a batch that failed ---------------------------------------------------
_PARTIAL_ATTR = "dfbatch_partial"


@dataclass(frozen=True, slots=True)
class Partial:
    """The rows of a failed call that were answered (already paid for): ``values`` has one item
    per row (a value or a ``RowError``), meaningful where ``answered`` is True."""

    values: list[Any]
    answered: list[bool]
    input_tokens: int = 0
    output_tokens: int = 0

    def outputs(self, error: BaseException) -> list[Any]:
        """One output per row: the answers, and ``error`` for the rows without one."""
        return [v if ok else error for v, ok in zip(self.values, self.answered, strict=True)]


def attach_partial(exc: BaseException, partial: Partial) -> BaseException:
    """Let ``exc`` carry the answers its call got before failing (returns ``exc``): when the
    caller gives up on the batch, those rows keep their answers and the others get ``exc``."""
    setattr(exc, _PARTIAL_ATTR, partial)
    return exc


def partial_of(exc: BaseException | None) -> Partial | None:
    """The answers ``exc`` carries (``attach_partial``), or None."""
    found = getattr(exc, _PARTIAL_ATTR, None)
    return found if isinstance(found, Partial) and any(found.answered) else None


# -- one output type per run ------------------------------------------------------------------
_KINDS = (("numeric", lambda t: t.is_numeric() or t == pl.Boolean),
          ("text", lambda t: t in (pl.String, pl.Categorical, pl.Enum)),
          ("temporal", lambda t: t.is_temporal()),
          ("list", lambda t: isinstance(t, (pl.List, pl.Array))),
          ("struct", lambda t: isinstance(t, pl.Struct)),
          ("binary", lambda t: t == pl.Binary))


def _kind(dtype: pl.DataType) -> str:
    return next((name for name, test in _KINDS if test(dtype)), str(dtype))


def declared(output_dtype: Any, name: str) -> dict[str, pl.DataType] | None:
    """``output_dtype=`` as a schema: one dtype names the ``output`` column's type."""
    if output_dtype is None:
        return None
    if isinstance(output_dtype, Mapping):
        return dict(output_dtype)
    return {name: output_dtype}


def decide_schema(frames: Sequence[pl.DataFrame], declared: Any = None) -> dict[str, pl.DataType]:
    """The output type of each column: declared (``output_dtype=``), else the first batch's.

    A column that is all-null in a batch (dtype ``Null``) does not decide: the first batch
    with values in it does.
    """
    schema: dict[str, pl.DataType] = {}
    if declared is not None:
        schema.update(declared)
    for frame in frames:
        for name, dtype in frame.schema.items():
            if name not in schema and dtype != pl.Null:
                schema[name] = dtype
    return schema


def conform(
    frame: pl.DataFrame, schema: dict[str, pl.DataType]
) -> tuple[pl.DataFrame, list[str | None] | None]:
    """Cast ``frame``'s columns to ``schema``; values that do not fit become per-row errors.

    A value fits when it keeps its kind (numbers, text, lists, structs, dates ...) and survives
    the cast unchanged (no lost fraction, no dropped struct field, no overflow). Rows that do
    not fit get a null output and an error text that says why.

    >>> import polars as pl
    >>> frame, errors = conform(pl.DataFrame({"output": [1.0, 2.5]}), {"output": pl.Int64})
    >>> frame["output"].to_list(), errors[0], errors[1][:61]
    ([1, None], None, "output 2.5 (Float64) does not fit the run's output type Int64")
    """
    errors: list[str | None] | None = None
    cols = []
    for s in frame.get_columns():
        target = schema.get(s.name)
        if target is None or s.dtype == target or s.dtype == pl.Null:
            cols.append(s.cast(target) if target is not None else s)
            continue
        fits, cast = _fitting(s, target)
        if fits.all():
            cols.append(cast)
            continue
        bad = np.flatnonzero(~fits)
        errors = errors if errors is not None else [None] * frame.height
        values = s.gather(bad).to_list()
        for i, v in zip(bad.tolist(), values, strict=True):
            if errors[i] is None:
                errors[i] = (f"output {_short(v)} ({s.dtype}) does not fit the run's output "
                             f"type {target} (decided by the first batch): return one type "
                             "from every batch, or declare output_dtype=")
        keep = pl.Series(fits)
        cols.append(cast.to_frame().select(pl.when(keep).then(pl.col(s.name)))[s.name])
    return pl.DataFrame(cols), errors


def _fitting(s: pl.Series, target: pl.DataType) -> tuple[np.ndarray, pl.Series]:
    if _kind(s.dtype) != _kind(target):
        return s.is_null().to_numpy(), pl.Series(s.name, [None] * s.len(), dtype=target)
    try:
        cast = s.cast(target, strict=False)
        back = cast.cast(s.dtype, strict=False)
        ok = s.is_null() | (cast.is_not_null() & back.eq_missing(s))
    except pl.exceptions.PolarsError:
        return s.is_null().to_numpy(), pl.Series(s.name, [None] * s.len(), dtype=target)
    return ok.to_numpy(), cast


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
