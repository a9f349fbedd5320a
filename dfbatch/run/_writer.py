"""The streaming result file: result chunks appended to one Parquet file under a temporary
name, renamed when complete; one type per column, decided by the first chunk."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


class Writer:
    """Appends result chunks to a Parquet file under a temporary name; ``commit`` renames it.

    The first chunk decides each column's type. A column all null so far (every row of the
    earlier chunks failed) takes the type a later chunk brings: the rows written so far are
    rewritten once under the settled schema. A later chunk's values that do not fit the decided
    type become row errors in the ``error`` column (``conform``), and so do values in output
    columns the first chunk did not have: nothing is lost silently, and no chunk fails the run.
    """

    def __init__(self, out: Path, error: str = "error") -> None:
        self.out = out
        self.error = error
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.decided: dict[str, pl.DataType] = {}
        self.undecided: set[str] = set()
        self.names: list[str] = []

    def write(self, result: pl.DataFrame) -> None:
        if self.writer is None:
            self.names = result.columns
            self.decided = {n: t for n, t in result.schema.items() if t != pl.Null}
            self.undecided = {n for n, t in result.schema.items() if t == pl.Null}
            table = result.to_arrow()
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            settled = {n: result.schema[n] for n in self.undecided
                       if n in result.columns and result.schema[n] != pl.Null}
            if settled:
                self._settle(result.select(list(settled)).to_arrow().schema)
                self.decided.update(settled)
                self.undecided -= settled.keys()
            table = self._conform(result).to_arrow()
            if table.schema != self.schema:
                table = table.cast(self.schema)
        self.writer.write_table(table)

    def _settle(self, schema: pa.Schema) -> None:
        """Rewrite the rows written so far with the null columns in ``schema`` typed by it."""
        assert self.schema is not None and self.writer is not None
        fields = [
            schema.field(f.name) if pa.types.is_null(f.type) and f.name in schema.names else f
            for f in self.schema
        ]
        settled = pa.schema(fields)
        if settled == self.schema:
            return
        self.writer.close()
        old = self.tmp.with_name(self.tmp.name + ".old")
        os.replace(self.tmp, old)
        self.schema, self.writer = settled, pq.ParquetWriter(self.tmp, settled)
        try:
            for batch in pq.ParquetFile(old).iter_batches():
                self.writer.write_table(pa.Table.from_batches([batch]).cast(settled))
        finally:
            old.unlink()

    def _conform(self, result: pl.DataFrame) -> pl.DataFrame:
        from dfbatch.execute._outputs import conform

        errors: list[str | None] = result[self.error].to_list()
        extra = [n for n in result.columns if n not in self.names]
        for name in extra:  # an output column the first chunk did not have
            for i in np.flatnonzero(result[name].is_not_null().to_numpy()).tolist():
                errors[i] = errors[i] or (f"output column {name!r} is not in the output of the "
                                          "first chunk: return the same columns every time")
        result = result.drop(extra)
        fitted, fit_errors = conform(result, self.decided)
        if fit_errors is not None:
            errors = [e or f for e, f in zip(errors, fit_errors, strict=True)]
        missing = [pl.lit(None, self.decided.get(n, pl.Null)).alias(n) for n in self.names
                   if n not in fitted.columns]
        fitted = fitted.with_columns(*missing, pl.Series(self.error, errors, dtype=pl.Utf8))
        return fitted.select(self.names)

    def commit(self) -> None:
        if self.writer is None:  # no rows at all: still write a (row-less) file
            pl.DataFrame().write_parquet(self.tmp)
        else:
            self.writer.close()
            self.writer = None
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
