"""Join the pool's per-row outcomes back into the result frame, and summaries derived from it.

The result has one row per input row, in input order: the input columns, the plan columns,
the output column(s), ``error`` (Utf8, null when ok), ``attempts``, ``run_batch_id`` and
``run_agent_id`` (the batch and agent that actually ran the row, after splitting, bisecting
and stealing), and the batch's ``started_at`` (UTC) and ``elapsed_s`` (first call to final
answer, retries and backoff included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import Columns
from dfbatch.errors import ColumnError, OutputError
from dfbatch.execute._outputs import Values, conform, decide_schema, declared, merged_column
from dfbatch.execute._recorder import Outcomes

_ROW = "__dfbatch_row"


def assemble(
    planned: pl.DataFrame, out: Outcomes, columns: Columns, output_dtype: Any = None, *,
    consume: bool = False,
) -> pl.DataFrame:
    """Build the result frame from the planned input and the pool's outcomes.

    Outputs get one type per column (``output_dtype``, else the first batch's); values that do
    not fit become row errors (``dfbatch.execute._outputs.conform``), never a failed assembly.
    ``consume``: ``out`` is not read again, so its buffers become the result's where they can
    (``started`` turns into the microseconds in place, the pieces are dropped once placed): the
    result costs no second copy of them.
    """
    c = columns
    n = planned.height
    ran = out.done & ~np.isnan(out.started)
    everyone = bool(ran.all())  # (the common case: nothing to null out, no mask built)
    if consume:
        micros = _micros_in_place(out.started, None if everyone else ran)
        out.started = np.zeros(0)
    else:
        floats = out.started * 1e6
        if not everyone:
            floats[~ran] = 0.0
        micros = floats.astype(np.int64)  # (one buffer at a time)
        del floats
    started = pl.Series(c.started_at, micros)
    del micros
    outputs = _outputs(out, n, c.output, output_dtype)
    if consume:
        out.pieces, out.last = [], None
    elapsed = pl.Series(c.elapsed_s, out.elapsed, dtype=pl.Float64)
    if np.isnan(out.elapsed).any():
        elapsed = elapsed.fill_nan(None)
    extra = pl.DataFrame(
        [
            out.errors.series(c.error),
            pl.Series(c.attempts, out.attempts, dtype=pl.UInt16),
            pl.Series(c.run_batch_id, out.run_batch, dtype=pl.UInt32),
            pl.Series(c.run_agent_id, out.run_agent, dtype=pl.UInt16),
            started.cast(pl.Datetime("us", "UTC")),
            elapsed,
        ]
    )
    del started, elapsed
    if not everyone:
        never = pl.Series(~ran)
        extra = extra.with_columns(
            pl.when(never).then(None)
            .otherwise(pl.col(c.run_batch_id, c.run_agent_id, c.started_at)).name.keep()
        )
    return pl.concat([planned, outputs, extra], how="horizontal")


def _micros_in_place(started: np.ndarray, ran: np.ndarray | None) -> np.ndarray:
    """``started`` (epoch seconds; rows not in ``ran`` read 0) as int64 microseconds, in its
    own buffer (a block at a time: no second array)."""
    ints = started.view(np.int64)
    step = 1 << 16
    for lo in range(0, len(started), step):
        block = started[lo:lo + step]
        block *= 1e6
        if ran is not None:
            block[~ran[lo:lo + step]] = 0.0
        ints[lo:lo + step] = block  # (same memory, same width: converted in place)
    return ints


def attach_partial(
    exc: BaseException, planned: pl.DataFrame, out: Outcomes, columns: Columns,
    output_dtype: Any = None, merge: Callable[[Outcomes], Outcomes] | None = None,
) -> None:
    """Attach the partial result to ``exc`` (``exc.partial``, a DataFrame) before it escapes.

    A run that raises after calls were made (a bug, a ``BaseException`` from fn, a second
    Ctrl-C) keeps every paid answer: the rows that finished have their outputs, the others an
    error saying why they did not run. ``merge`` adds the rows a checkpoint already held.
    Never masks ``exc``: if the partial result cannot be built, nothing is attached.
    """
    if getattr(exc, "partial", None) is not None:
        return
    try:
        full = merge(out) if merge is not None else out
        reason = f"not finished: the run raised {type(exc).__name__}: {exc}"[:300]
        for i in np.flatnonzero(~full.done).tolist():
            if full.errors[i] is None:
                full.errors[i] = reason
        partial = assemble(planned, full, columns, output_dtype)
        exc.partial = partial  # type: ignore[attr-defined]
    except Exception:
        return
    note = (f"dfbatch: {int(full.done.sum())} of {planned.height} rows finished before this "
            "error; the partial result is in exc.partial (a DataFrame)")
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def _outputs(out: Outcomes, n: int, name: str, output_dtype: Any = None) -> pl.DataFrame:
    """The output columns, one type per column for the whole run (``conform``): values that
    do not fit the type decided by ``output_dtype`` or the first batch become row errors."""
    pieces = _frames(out)
    if not pieces:
        empty = pl.DataFrame({name: pl.Series(name, [None] * n, dtype=pl.Null)})
        schema = declared(output_dtype, name)
        return empty if schema is None else conform(empty, schema)[0]
    rows = np.concatenate([r for r, _ in pieces])
    schema = decide_schema([f for _, f in pieces], declared(output_dtype, name))
    frames = []
    fine: dict[tuple[Any, ...], bool] = {}  # a piece already of the run's types needs no cast
    for piece_rows, frame in pieces:
        key = tuple(frame.schema.items())
        ok = fine.get(key)
        if ok is None:
            ok = fine[key] = all(schema.get(n, d) == d for n, d in key)
        if ok:
            frames.append(frame)
            continue
        fitted, errors = conform(frame, schema)
        if errors is not None:
            for i, err in zip(piece_rows.tolist(), errors, strict=True):
                if err is not None and out.errors[i] is None:
                    out.errors[i] = err
        frames.append(fitted)
    return _placed(pl.concat(frames, how="diagonal_relaxed"), rows, n)


def _placed(frame: pl.DataFrame, rows: np.ndarray, n: int) -> pl.DataFrame:
    """``frame``'s row ``i`` at row ``rows[i]`` of ``n`` rows; rows no piece answered are null.

    One gather by an index (no join: a join's hash table costs more memory than the outputs).
    """
    kind: type[np.signedinteger[Any]] = np.int32 if n < 2**31 else np.int64  # (half the
    at = np.full(n, -1, kind)  # memory of a million-row index)
    at[rows] = np.arange(len(rows), dtype=kind)
    index = pl.Series(_ROW, at)
    if len(rows) < n:
        index = index.scatter(np.flatnonzero(at < 0), None)
    return frame.select(pl.all().gather(index))


def _frames(out: Outcomes) -> list[tuple[np.ndarray, pl.DataFrame]]:
    """The pieces as frames; each run of consecutive ``Values`` pieces of one Python type
    becomes one frame built at once where that changes nothing (the type its first batch alone
    would get, no value lost), else one frame per piece. A piece polars cannot build fails its
    rows."""
    result: list[tuple[np.ndarray, pl.DataFrame]] = []
    run: list[tuple[np.ndarray, Values]] = []
    kind: list[type | None] = [None]  # the run's one Python type (None: no value yet)

    def flush() -> None:
        merged = _merged(run)
        if merged is not None:
            result.append(merged)
        else:
            for rows, piece in run:
                try:
                    result.append((rows, piece.frame()))
                except OutputError as exc:
                    for i in rows.tolist():
                        out.errors[i] = out.errors[i] or str(exc)
        run.clear()
        kind[0] = None

    for rows, piece in out.pieces:
        if isinstance(piece, Values):
            if run and (run[0][1].name != piece.name
                        or (None not in (kind[0], piece.kind) and kind[0] is not piece.kind)):
                flush()
            run.append((rows, piece))
            kind[0] = kind[0] or piece.kind
            continue
        if run:
            flush()
        result.append((rows, piece))
    if run:
        flush()
    return result


def _merged(run: list[tuple[np.ndarray, Values]]) -> tuple[np.ndarray, pl.DataFrame] | None:
    if len(run) == 1:
        return None
    first = next((v.values for _, v in run if any(x is not None for x in v.values)), None)
    column = merged_column(run[0][1].name, [x for _, v in run for x in v.values], first)
    return None if column is None else (np.concatenate([r for r, _ in run]), column)


def _require(result: pl.DataFrame, columns: Columns) -> None:
    missing = [x for x in columns.result_names() if x not in result.columns]
    if missing:
        msg = (
            f"this frame is not a dfbatch result (missing {missing}); "
            "call df.batch.process(fn, ...) first"
        )
        raise ColumnError(msg)


def batches(result: pl.DataFrame, columns: Columns | None = None) -> pl.DataFrame:
    """One row per batch that ran: agent, planned agent, rows, tokens, timing, attempts, errors.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> out = pl.DataFrame({"text": list("abcdef")}).batch.process(
    ...     lambda b: b["text"].str.to_uppercase(), items_per_batch=4, agents=2, progress=False)
    >>> out.batch.batches().select("run_batch_id", "rows", "failed_rows").sort("run_batch_id")
    shape: (2, 3)
    ┌──────────────┬──────┬─────────────┐
    │ run_batch_id ┆ rows ┆ failed_rows │
    │ ---          ┆ ---  ┆ ---         │
    │ u32          ┆ u32  ┆ u32         │
    ╞══════════════╪══════╪═════════════╡
    │ 0            ┆ 4    ┆ 0           │
    │ 1            ┆ 2    ┆ 0           │
    └──────────────┴──────┴─────────────┘
    """
    c = columns or Columns()
    _require(result, c)
    return (
        result.filter(pl.col(c.run_batch_id).is_not_null())
        .group_by(c.run_batch_id, maintain_order=True)
        .agg(
            pl.col(c.run_agent_id).first(),
            pl.col(c.agent_id).first().alias("planned_agent_id"),
            pl.len().cast(pl.UInt32).alias("rows"),
            pl.col(c.n_tokens).sum().alias("tokens"),
            pl.col(c.started_at).first(),
            pl.col(c.elapsed_s).first(),
            pl.col(c.attempts).max(),
            pl.col(c.error).is_not_null().sum().cast(pl.UInt32).alias("failed_rows"),
        )
    )


def agents(result: pl.DataFrame, columns: Columns | None = None) -> pl.DataFrame:
    """One row per agent: batches, rows, tokens, busy seconds, failed rows, stolen batches.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> out = pl.DataFrame({"text": list("abcdefgh")}).batch.process(
    ...     lambda b: b["text"], items_per_batch=2, agents=2, progress=False)
    >>> out.batch.agents()["rows"].sum()
    8
    """
    c = columns or Columns()
    per_batch = batches(result, c)
    return (
        per_batch.group_by(c.run_agent_id)
        .agg(
            pl.len().cast(pl.UInt32).alias("batches"),
            pl.col("rows").sum(),
            pl.col("tokens").sum(),
            pl.col(c.elapsed_s).sum().alias("busy_s"),
            pl.col("failed_rows").sum(),
            (pl.col(c.run_agent_id) != pl.col("planned_agent_id")).sum().alias("stolen"),
        )
        .sort(c.run_agent_id)
    )
