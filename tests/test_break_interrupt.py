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


def test_rows_answered_in_a_batch_cut_at_the_drains_end_are_not_paid_for_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """llm.chat per row: a refusal drains the run; a batch whose other rows were answered
    (paid for) has one row that never comes back, and is cancelled after DRAIN_S. Its
    answered rows were lost: the resume sent them again. Now they are stashed, and the rerun
    with the same fn takes them without a request."""
    import json

    import httpx
    import openai

    import dfbatch.llm
    from dfbatch.execute import _pool

    monkeypatch.setattr(_pool, "DRAIN_S", 0.3)
    asked: list[str] = []
    refuse = [True]

    async def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        asked.append(text)
        if text == "row 0" and refuse[0]:
            await asyncio.sleep(0.05)
            return httpx.Response(401, json={"error": {
                "message": "Incorrect API key provided", "code": "invalid_api_key"}})
        await asyncio.sleep(60 if text == "row 7" and refuse[0] else 0.01)
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text.upper()}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})

    async def main() -> list[str | None]:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = openai.AsyncOpenAI(api_key="k", base_url="http://api.test/v1",
                                    http_client=http, max_retries=0)
        fn = dfbatch.llm.chat("m", "{text}", client=client, max_tokens=8)
        df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})
        with pytest.raises(dfbatch.RunStoppedError, match="API key was refused"):
            await dfbatch.aprocess(df, fn, items_per_batch=4, agents=2, **QUIET)
        refuse[0] = False
        asked.clear()
        out = await dfbatch.aprocess(df, fn, items_per_batch=4, agents=2, **QUIET)
        return out["output"].to_list()

    assert asyncio.run(main()) == [f"ROW {i}" for i in range(8)]
    assert sorted(asked) == ["row 0", "row 7"]  # (rows 1-3: stashed as batch 0 failed)
