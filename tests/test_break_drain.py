"""A run stopped by the provider, broken on purpose: each test pins a fix (see its docstring)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest

import dfbatch
from dfbatch.execute._outputs import Partial, attach_partial

QUIET = {"progress": False, "hedge_after": None}
REFUSED = "Incorrect API key provided"


class _Refused(Exception):
    status_code = 401


class _ServerError(Exception):
    status_code = 500


class _RetriedWhileRefused:
    """Batch "A" (rows 0-3): rows 0-2 answered, row 3 fails with a 500 (retried: the answers
    are attached); batch "B" (rows 4-7) is refused (401) meanwhile, while A backs off (or
    before A's error, ``a_first``)."""

    dfbatch_fingerprint: ClassVar[dict[str, str]] = {"fn": "RetriedWhileRefused"}

    def __init__(self, a_first: bool) -> None:
        self.a_first = a_first
        self.sent: list[str] = []
        self.refuse = True

    async def __call__(self, batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()
        if not self.refuse:
            self.sent.extend(texts)
            return [t.upper() for t in texts]
        if "row 4" in texts:
            await asyncio.sleep(0.1 if self.a_first else 0.05)
            raise _Refused(REFUSED)
        await asyncio.sleep(0.05 if self.a_first else 0.1)
        answered = [t != "row 3" for t in texts]
        self.sent.extend(t for t, ok in zip(texts, answered, strict=True) if ok)
        raise attach_partial(_ServerError("upstream failed"), Partial(
            [t.upper() if ok else None for t, ok in zip(texts, answered, strict=True)],
            answered))


@pytest.mark.parametrize("a_first", [False, True])
def test_answers_of_a_batch_cut_off_in_its_retry_by_a_refusal_are_kept(
        tmp_path: Path, a_first: bool) -> None:
    """A batch whose try failed with a transient error after some rows were answered (paid
    for) is retried; when a refusal stops the run before the retry, the answers were dropped
    (only a run-stopping error of the batch's own kept them): a resume paid for them again."""
    from benchmarks.simapi import run

    fn = _RetriedWhileRefused(a_first)
    df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})

    async def first() -> pl.DataFrame:
        with pytest.raises(dfbatch.RunStoppedError, match="API key was refused") as stopped:
            await dfbatch.aprocess(df, fn, checkpoint=tmp_path, items_per_batch=4, agents=2,
                                   backoff_base=1.0, **QUIET)
        assert stopped.value.partial is not None
        return stopped.value.partial

    partial = run(first())
    assert partial["output"].to_list() == ["ROW 0", "ROW 1", "ROW 2"] + [None] * 5
    fn.refuse = False
    out = dfbatch.process(df, fn, checkpoint=tmp_path, items_per_batch=4, **QUIET)
    assert out["output"].to_list() == [f"ROW {i}" for i in range(8)]
    assert sorted(fn.sent) == sorted([f"row {i}" for i in range(8)])  # none paid for twice
