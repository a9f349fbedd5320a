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

_SCALARS = (int, float, str, bool)


class Values:
    """A batch's outputs as fn returned them: a list of plain scalars of one Python type (None
    allowed). Polars needs ~20 µs to build a Series however short it is, so the run keeps the
    list and builds one column for many batches at the end (``dfbatch.execute._result``);
    ``frame()`` builds this batch's alone (the journal, a mixed run)."""

    __slots__ = ("kind", "name", "values")

    def __init__(self, name: str, values: list[Any], kind: type | None = None) -> None:
        self.name, self.values, self.kind = name, values, kind  # kind None: all values None

    @property
    def height(self) -> int:
        return len(self.values)

    def frame(self) -> pl.DataFrame:
        return _column(self.name, self.values)

    def __reduce__(self) -> tuple[Any, ...]:  # (shipped back by Ray actors)
        return (Values, (self.name, self.values, self.kind))


Output = pl.DataFrame | Values


def as_frame(piece: Output) -> pl.DataFrame:
    """A batch's outputs as a frame."""
    return piece.frame() if isinstance(piece, Values) else piece


def merged_column(name: str, values: list[Any], first: list[Any] | None) -> pl.DataFrame | None:
    """One column for the ``values`` of several batches (of one Python type) where that changes
    nothing: the type that ``first`` (the values of the first batch with a value; None: no
    value) would get alone, no value lost. None where it would: build one frame per batch."""
    try:
        column = pl.Series(name, values, strict=False)
        alone = _column(name, first).to_series().dtype if first is not None else pl.Null
    except Exception:
        return None
    if column.dtype != alone or column.null_count() != sum(x is None for x in values):
        return None
    return column.to_frame()


def _column(name: str, values: list[Any]) -> pl.DataFrame:
    try:
        return pl.Series(name, values, strict=False).to_frame()
    except Exception as exc:
        msg = f"fn returned values polars cannot put in one column ({exc}); return one type"
        raise OutputError(msg) from None


def _scalar_kind(values: list[Any]) -> tuple[bool, type | None]:
    """Are ``values`` plain scalars of one Python type, and which (None: all None)?"""
    kind: type | None = None
    for v in values:
        if v is None:
            continue
        if kind is None:
            kind = type(v)
            if kind not in _SCALARS:
                return False, None
        elif type(v) is not kind:
            return False, None
    return True, kind


def normalize(
    value: Any, n_rows: int, name: str, *, reserved: set[str]
) -> tuple[Output, list[str | None] | None]:
    """Validate fn's return value for a batch of ``n_rows`` rows.

    Returns the outputs (``n_rows`` rows: a frame, or ``Values`` for a list of plain scalars of
    one type) and the per-row error texts (None when no row failed). Raises ``OutputError``
    with a message that says what fn should return.
    """
    errors: list[str | None] | None = None
    if type(value) is list and len(value) == n_rows:
        plain, kind = _scalar_kind(value)
        if plain:
            return Values(name, list(value), kind), None  # (a copy: fn may reuse its list)
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
        values, errors = _one_family(values, errors)
        try:
            series, errors = _nested(name, values, errors)
            frame = series.to_frame()
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


def _family(v: Any) -> str:
    if isinstance(v, bool):  # not a number: True is not 1
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (list, tuple)):
        return "list"
    return type(v).__name__


def _one_family(
    values: list[Any], errors: list[str | None] | None
) -> tuple[list[Any], list[str | None] | None]:
    """One kind of value per batch, decided by its first value; other rows become errors.

    Numbers mix (ints and floats make floats); booleans, text, bytes, lists and dicts do not
    mix with each other or with numbers, and are never turned into text.
    """
    first = next((v for v in values if v is not None), None)
    if first is None:
        return values, errors
    family = _family(first)
    out = list(values)
    for i, v in enumerate(values):
        if v is None or _family(v) == family:
            continue
        errors = errors if errors is not None else [None] * len(values)
        errors[i] = (f"output {_short(v)} ({type(v).__name__}) does not fit this batch's "
                     f"output type, decided by its first value {_short(first)} "
                     f"({type(first).__name__}): return one type from every row")
        out[i] = None
    if family == "number" and any(isinstance(v, float) for v in out):
        out = [None if v is None else float(v) for v in out]
    return out, errors


def _nested(
    name: str, values: list[Any], errors: list[str | None] | None
) -> tuple[pl.Series, list[str | None] | None]:
    """The batch's column; a list / dict that polars would change (text from numbers, a lost
    field or fraction, 1 from True) becomes that row's error instead."""
    first = next((v for v in values if v is not None), None)
    if not isinstance(first, (list, tuple, dict)):
        return pl.Series(name, values, strict=True), errors
    series = pl.Series(name, values, strict=False)
    if series.dtype == pl.Object:
        return series, errors
    bad = _changed(values, series)
    if not bad:
        return series, errors
    if len(bad) == sum(v is not None for v in values):  # no common type: the first that
        alone = ((v, pl.Series(name, [v], strict=False)) for v in values if v is not None)
        dtype = next((a.dtype for v, a in alone if a.dtype != pl.Object and not _changed(
            [v], a)), None)  # polars keeps unchanged decides
        if dtype is not None:
            series = pl.Series(name, values, dtype=dtype, strict=False)
            bad = _changed(values, series)
    errors = errors if errors is not None else [None] * len(values)
    kept = list(values)
    for i in bad:
        errors[i] = (f"output {_short(values[i])} does not fit one column with this batch's "
                     f"other outputs ({series.dtype}) unchanged: return one type from every row")
        kept[i] = None
    return pl.Series(name, kept, strict=False), errors


def _changed(values: list[Any], series: pl.Series) -> list[int]:
    return [i for i, (v, got) in enumerate(zip(values, series.to_list(), strict=True))
            if not _same(v, got)]


def _same(v: Any, got: Any) -> bool:
    """``got`` (read back from polars) is ``v``, with no coercion (True is not 1, 1 not "1")."""
    if v is None or isinstance(v, (bool, str, bytes)):
        return type(got) is type(v) and got == v
    if isinstance(v, (int, float)):
        return (isinstance(got, (int, float)) and not isinstance(got, bool)
                and (got == v or (got != got and v != v)))  # NaN is NaN
    if isinstance(v, (list, tuple)):
        return (isinstance(got, list) and len(got) == len(v)
                and all(_same(a, b) for a, b in zip(v, got, strict=True)))
    if isinstance(v, dict):
        return isinstance(got, dict) and set(v) <= set(got) and all(
            _same(v.get(k), got[k]) for k in got)
    try:
        return bool(got == v)
    except Exception:  # an object that cannot compare: polars keeps objects
        return True


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
_KINDS = (("numeric", lambda t: t.is_numeric()),
          ("boolean", lambda t: t == pl.Boolean),
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
        wide = _widened(target)  # a declared Float32 accepts floats: the precision is asked for
        cast = s.cast(wide, strict=False)
        back = cast.cast(s.dtype, strict=False)
        ok = s.is_null() | (cast.is_not_null() & back.eq_missing(s))
        if wide != target:
            narrow = cast.cast(target, strict=False)
            ok = ok & (s.is_null() | narrow.is_not_null())
            ok = ok & (_infinities(narrow) == _infinities(cast))  # out of Float32's range
            cast = narrow
    except pl.exceptions.PolarsError:
        return s.is_null().to_numpy(), pl.Series(s.name, [None] * s.len(), dtype=target)
    return ok.to_numpy(), cast


def _infinities(s: pl.Series) -> pl.Series:
    """Per row, how many infinite floats ``s`` holds (floats and lists of floats; else 0)."""
    if s.dtype.is_float():
        return s.is_infinite().fill_null(False).cast(pl.UInt32)
    if isinstance(s.dtype, pl.Array):
        s = s.cast(pl.List(s.dtype.inner))
    if isinstance(s.dtype, pl.List) and s.dtype.inner.is_float():
        return s.list.eval(pl.element().is_infinite().sum()).list.first().fill_null(0)
    return pl.Series([0] * s.len(), dtype=pl.UInt32)


def _widened(dtype: Any) -> pl.DataType:
    """``dtype`` with Float32 (also inside lists / arrays / structs) read as Float64."""
    if dtype == pl.Float32:
        return pl.Float64()
    if isinstance(dtype, pl.List):
        return pl.List(_widened(dtype.inner))
    if isinstance(dtype, pl.Array):
        return pl.Array(_widened(dtype.inner), dtype.shape)
    if isinstance(dtype, pl.Struct):
        return pl.Struct({f.name: _widened(f.dtype) for f in dtype.fields})
    return dtype


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
