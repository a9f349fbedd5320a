"""RowErrors: a run's per-row messages, sparse while few, read and written like a list."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dfbatch.execute._rowerrors import RowErrors


@pytest.mark.parametrize("k", [0, 3, 40])  # none, sparse, past the switch to a list
def test_it_reads_writes_builds_and_moves_like_the_list_it_stands_for(k: int) -> None:
    n = 100
    rng = np.random.default_rng(k)
    ref: list[str | None] = [None] * n
    e = RowErrors(n)
    for i in rng.choice(n, k, replace=False).tolist():
        ref[i] = e[i] = f"err {i}"
    e[-1] = ref[-1] = "last"
    e[5] = ref[5] = None  # clearing works in both forms
    assert list(e) == ref and e.tolist() == ref and len(e) == n
    assert [e[i] for i in range(n)] == ref
    s = e.series("error")
    assert s.name == "error" and s.dtype == pl.Utf8
    assert s.equals(pl.Series("error", ref, dtype=pl.Utf8))
    at = rng.permutation(n + 10)[:n]
    moved = np.full(n + 10, None, object)
    moved[at] = ref
    assert list(e.placed(n + 10, at)) == moved.tolist()


def test_out_of_range_rows_raise_like_a_list() -> None:
    e = RowErrors(3)
    with pytest.raises(IndexError):
        e[3] = "x"
    with pytest.raises(IndexError):
        e[-4]


def test_few_errors_are_held_without_a_slot_per_row() -> None:
    e = RowErrors(1_000_000)
    e[7] = "boom"
    assert e._dense is None and len(e._sparse) == 1
    for i in range(70_000):  # past one row in 16: a list, as compact as it gets
        e[i] = "boom"
    assert e._dense is not None and not e._sparse and e[7] == "boom" and e[999_999] is None
