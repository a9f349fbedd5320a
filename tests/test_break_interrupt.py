"""Ctrl-C, Stop and bad arguments around a run with a checkpoint, broken on purpose: each test
pins a fix (see its docstring)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import polars as pl
import pytest

import dfbatch
from dfbatch.run._prepare import _Job

QUIET = {"progress": False, "hedge_after": None}


def _upper(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.to_uppercase()


def test_a_bad_cache_argument_does_not_leave_the_checkpoint_locked(tmp_path: Path) -> None:
    """checkpoint= is opened (and locked) before cache= is checked: a bad cache= raised with
    the lock still held by this process, and the rerun with the argument fixed was told the
    checkpoint 'is in use by another run' (in a notebook: until the kernel restarts)."""
    df = pl.DataFrame({"text": ["a", "b", "c"]})
    with pytest.raises(dfbatch.ConfigError, match="cache must be"):
        dfbatch.process(df, _upper, checkpoint=tmp_path, cache=123, **QUIET)
    with pytest.raises(dfbatch.ConfigError, match="cache key column 'nope'"):
        dfbatch.process(df, _upper, checkpoint=tmp_path, cache=tmp_path / "c.db",
                        cache_key=["nope"], **QUIET)
    out = dfbatch.process(df, _upper, checkpoint=tmp_path, **QUIET)
    assert out["output"].to_list() == ["A", "B", "C"]


def test_ctrl_c_while_the_checkpoint_is_read_releases_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling aprocess (Ctrl-C) while it reads the journal (a worker thread, before the
    pool starts) left the journal open and locked: the rerun in the same process failed."""
    slow = _Job.narrow

    def narrow(self: _Job) -> object:
        time.sleep(0.05)  # (a big checkpoint to read)
        return slow(self)

    monkeypatch.setattr(_Job, "narrow", narrow)
    df = pl.DataFrame({"text": ["a", "b", "c"]})

    async def main() -> None:
        task = asyncio.ensure_future(dfbatch.aprocess(df, _upper, checkpoint=tmp_path, **QUIET))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    out = dfbatch.process(df, _upper, checkpoint=tmp_path, **QUIET)
    assert out["output"].to_list() == ["A", "B", "C"]
