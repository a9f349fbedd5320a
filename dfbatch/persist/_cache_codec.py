"""The response cache's bytes: answers as Arrow IPC streams, keys as packed int64 arrays.

Nothing executable is stored. One write's answers are one Arrow IPC stream (a *chunk*); the
128-bit keys of its rows are one blob of little-endian int64s (every row's first half, then
every row's second half), so a lookup of many keys reads a chunk's keys with one
``np.frombuffer`` instead of one SQLite row per key. A row whose key moved to a newer chunk
(``cache="refresh"``, an answer replacing a stored error) is blanked to the key (0, 0).

>>> import numpy as np, pyarrow as pa
>>> a, b = unpack_keys(pack_keys(np.array([1, 2]), np.array([3, 4])))
>>> a.tolist(), b.tolist()
([1, 2], [3, 4])
>>> decode(encode(pa.table({"x": [1, 2]}))).to_pydict()
{'x': [1, 2]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl


def encode(table: Any) -> bytes:
    """An Arrow table as the bytes of one IPC stream (data only: nothing executable)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def decode(blob: bytes) -> Any:
    """The Arrow table ``encode`` wrote."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def pack_keys(k1: np.ndarray, k2: np.ndarray) -> bytes:
    """The keys of a chunk's rows (int64 halves) as one blob."""
    return np.concatenate([k1, k2]).astype("<i8").tobytes()


def unpack_keys(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``pack_keys``'s two int64 arrays (read-only views of ``blob``)."""
    both = np.frombuffer(blob, "<i8")
    half = len(both) // 2
    return both[:half], both[half:]


def blank(blob: bytes, rows: np.ndarray) -> bytes:
    """``blob`` with the keys of ``rows`` set to (0, 0): rows no lookup will find."""
    both = np.frombuffer(blob, "<i8").copy()
    half = len(both) // 2
    both[rows] = 0
    both[half + rows] = 0
    return both.tobytes()


def gather(blobs: Mapping[int, bytes | None], pos: np.ndarray, chunk: np.ndarray,
           idx: np.ndarray) -> list[tuple[np.ndarray, Any]]:
    """The answers of hits (query position, chunk, row in it): each chunk decoded once, the
    rows asked for taken, one table per output schema, as [(positions, Arrow table)].

    A chunk without data (every row failed, or evicted meanwhile) gives nothing."""
    import pyarrow as pa

    order = np.argsort(chunk, kind="stable")
    ids, starts = np.unique(chunk[order], return_index=True)
    by_schema: dict[Any, tuple[list[np.ndarray], list[Any]]] = {}
    for i, rows in zip(ids.tolist(), np.split(order, starts[1:]), strict=True):
        blob = blobs.get(i)
        if blob is None:
            continue
        table = decode(blob).take(pa.array(idx[rows]))
        got = by_schema.setdefault(table.schema, ([], []))
        got[0].append(pos[rows])
        got[1].append(table)
    return [(np.concatenate(p), pa.concat_tables(t)) for p, t in by_schema.values()]


def float_bits(frame: pl.DataFrame) -> pl.DataFrame | None:
    """``frame`` with every float (at any depth: lists, arrays, structs) read as its bits, or
    None when it holds no float.

    ``hash_rows`` hashes values as ``==`` compares them: ``-0.0`` as ``0.0``, every NaN alike.
    A fn tells them apart (``str(-0.0)``, ``math.copysign``, a NaN's sign and payload), so the
    cache keys the bits: distinct bits, distinct keys (null stays null).

    >>> float_bits(pl.DataFrame({"x": [0.0, -0.0, None]}))["x"].to_list()
    [0, -9223372036854775808, None]
    >>> float_bits(pl.DataFrame({"s": ["a"]})) is None
    True
    """
    if not any(_has_float(t) for t in frame.dtypes):
        return None
    return frame.with_columns(
        pl.Series(name, pl.from_arrow(_as_bits(frame[name].to_arrow())))
        for name, t in frame.schema.items() if _has_float(t))


def _has_float(t: Any) -> bool:
    if t.is_float():
        return True
    if isinstance(t, (pl.List, pl.Array)):
        return _has_float(t.inner)
    if isinstance(t, pl.Struct):
        return any(_has_float(f.dtype) for f in t.fields)
    return False


def _as_bits(arr: Any) -> Any:
    """An Arrow array viewed with its floats as same-width integers (no copy)."""
    return arr.view(_bits_type(arr.type))


def _bits_type(t: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_floating(t):
        return {16: pa.int16(), 32: pa.int32(), 64: pa.int64()}[t.bit_width]
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_bits_type(t.field(i).type))
                          for i in range(t.num_fields)])
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_bits_type(t.value_type)), t.list_size)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_bits_type(t.value_type)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_bits_type(t.value_type)))
    return t
