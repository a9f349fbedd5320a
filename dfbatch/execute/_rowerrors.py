"""The per-row error messages of a run (``Outcomes.errors``): None for a row without one.

Most runs have few errors, and a list of a million ``None`` holds 8 MB: ``RowErrors`` keeps
them in a dict (row -> message) until one row in 16 has one, then in a list (a dict entry
with its int key holds ~100 bytes, a list slot 8). Indexing reads and writes it like the list
it stands for.

Examples
--------
>>> e = RowErrors(4)
>>> e[2] = "timeout"
>>> list(e), len(e)
([None, None, 'timeout', None], 4)
>>> e.series("error").to_list()
[None, None, 'timeout', None]
>>> list(e.placed(6, np.array([5, 4, 3, 2])))
[None, None, None, 'timeout', None, None]
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

_DENSE = 16  # a list once more than one row in _DENSE has an error


class RowErrors:
    """``n`` optional messages, stored sparsely while few (module docstring)."""

    __slots__ = ("_dense", "_sparse", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self._sparse: dict[int, str] = {}
        self._dense: list[str | None] | None = None

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        j = i + self.n if i < 0 else i
        if not 0 <= j < self.n:
            msg = f"row {i} is out of range for {self.n} rows"
            raise IndexError(msg)
        return int(j)

    def __getitem__(self, i: int) -> str | None:
        if self._dense is not None:
            return self._dense[i]
        return self._sparse.get(self._check(i))

    def __setitem__(self, i: int, msg: str | None) -> None:
        if self._dense is not None:
            self._dense[i] = msg
            return
        i = self._check(i)
        if msg is None:
            self._sparse.pop(i, None)
            return
        self._sparse[i] = msg
        if len(self._sparse) * _DENSE > self.n:
            dense: list[str | None] = [None] * self.n
            for j, m in self._sparse.items():
                dense[j] = m
            self._dense, self._sparse = dense, {}

    def __iter__(self) -> Iterator[str | None]:
        if self._dense is not None:
            return iter(self._dense)
        get = self._sparse.get
        return (get(i) for i in range(self.n))

    def tolist(self) -> list[str | None]:
        return list(self)

    def series(self, name: str) -> pl.Series:
        """The messages as a String column (null where none)."""
        if self._dense is not None:
            return pl.Series(name, self._dense, dtype=pl.Utf8)
        out = pl.repeat(None, self.n, dtype=pl.Utf8, eager=True).alias(name)
        if self._sparse:
            at = sorted(self._sparse)
            out = out.scatter(at, [self._sparse[i] for i in at])
        return out

    def placed(self, n: int, at: np.ndarray) -> RowErrors:
        """These messages at rows ``at`` (``at[i]``: where row ``i`` goes) of ``n`` rows."""
        out = RowErrors(n)
        if self._dense is not None:
            moved = np.full(n, None, object)
            moved[at] = self._dense
            out._dense = moved.tolist()
        else:
            where = at.tolist() if len(self._sparse) > 64 else None
            for i, m in self._sparse.items():
                out[where[i] if where is not None else int(at[i])] = m
        return out
