"""The outputs a run has received, in the order batches were answered: ``(rows, output)`` pairs.

A million-row run answers hundreds of thousands of batches; a Python list, an index array and a
tuple for each would hold more memory than the outputs themselves. ``Pieces`` gathers the plain
values (``Values``) of consecutive contiguous batches of one column and one Python type in one
list, with each batch's start and size in compact arrays, and builds them into one column every
``CHUNK`` values (``merged_column``: only where that changes no value or type; otherwise each
batch stays its own piece, as ``dfbatch.execute._result`` would have built it). Other outputs
(frames, scattered batches) are kept as they come.

Examples
--------
>>> import numpy as np
>>> p = Pieces()
>>> p.add(np.arange(0, 2), 0, Values("output", [1, 2], int))
>>> p.add(np.arange(2, 4), 2, Values("output", [3, None], int))
>>> [(rows.tolist(), frame["output"].to_list()) for rows, frame in p.items()]
[([0, 1, 2, 3], [1, 2, 3, None])]
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np

from dfbatch.execute._outputs import Output, Values, merged_column

CHUNK = 1 << 16  # values gathered before they are built into a column


class Pieces:
    """``(rows, output)`` pairs, some gathered (see the module's docstring)."""

    __slots__ = ("_at", "_done", "_kind", "_name", "_sizes", "_values")

    def __init__(self, items: Iterable[tuple[np.ndarray, Output]] = ()) -> None:
        self._done: list[tuple[np.ndarray, Output]] = list(items)
        self._name: str | None = None  # the open chunk's column (None: no open chunk)
        self._kind: type | None = None  # its one Python type (None: no value yet)
        self._values: list[Any] = []
        self._at, self._sizes = array("q"), array("q")

    def add(self, rows: np.ndarray, at: int, piece: Output) -> None:
        """Batch ``rows`` answered ``piece`` (``at`` >= 0: the rows are ``at .. at + n``)."""
        if not isinstance(piece, Values) or at < 0:
            self.flush()
            self._done.append((rows, piece))
            return
        name, kind, values = piece.name, piece.kind, piece.values
        if self._name is not None and (
            self._name != name or len(self._values) >= CHUNK
            or (kind is not None and self._kind is not None and self._kind is not kind)
        ):
            self.flush()
        self._name = name
        if self._kind is None:
            self._kind = kind
        self._values.extend(values)
        self._at.append(at)
        self._sizes.append(len(values))

    def flush(self) -> None:
        """Build the open chunk into one column (or one piece per batch where it must)."""
        if self._name is None:
            return
        name, values = self._name, self._values
        sizes = np.frombuffer(self._sizes, np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        starts = np.frombuffer(self._at, np.int64)
        rows = np.repeat(starts - bounds[:-1], sizes) + np.arange(bounds[-1])
        if (starts + sizes).max() <= 2**31:
            rows = rows.astype(np.int32)  # (half the memory)
        edges = bounds.tolist()
        column = None
        if len(sizes) > 1:
            i = next((i for i, x in enumerate(values) if x is not None), None)
            b = None if i is None else int(np.searchsorted(bounds, i, "right")) - 1
            first = None if b is None else values[edges[b]:edges[b + 1]]
            column = merged_column(name, values, first)
        if column is not None:
            self._done.append((rows, column))
        else:  # each batch alone, as the assembly builds it
            for lo, hi in itertools.pairwise(edges):
                part = values[lo:hi]
                kind = self._kind if any(x is not None for x in part) else None
                self._done.append((rows[lo:hi], Values(name, part, kind)))
        self._name, self._kind, self._values = None, None, []
        self._at, self._sizes = array("q"), array("q")

    def items(self) -> list[tuple[np.ndarray, Output]]:
        """Every pair so far (the open chunk built first)."""
        self.flush()
        return self._done
