"""Limits against real providers, broken on purpose: each test pins a fix (see its docstring)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest

import dfbatch
import dfbatch.llm
from dfbatch.execute._outputs import Partial, attach_partial

QUIET = {"progress": False, "items_per_batch": 4, "hedge_after": None}


class _Refused(Exception):
    """An account-wide refusal (a 401), as an SDK raises it."""

    status_code = 401


class _RefusedAtRow5:
    """Answers every row; while ``refuse``, the batch of "row 5" is refused (a 401) after its
    other rows were answered (its identity is declared: its state changes between runs)."""

    dfbatch_fingerprint: ClassVar[dict[str, str]] = {"fn": "RefusedAtRow5"}

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.refuse = True

    async def __call__(self, batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()
        if not self.refuse or "row 5" not in texts:
            await asyncio.sleep(0.05)  # (after the refusal: stopped before it answers)
            self.sent.extend(texts)
            return [t.upper() for t in texts]
        answered = [t != "row 5" for t in texts]
        self.sent.extend(t for t, ok in zip(texts, answered, strict=True) if ok)
        raise attach_partial(_Refused("Incorrect API key provided"),
                             Partial([t.upper() for t in texts], answered))


def test_rows_answered_before_a_run_stopping_error_keep_their_answers(tmp_path: Path) -> None:
    """A per-row fn whose batch got some answers (paid for) before a 401 stopped the run: those
    rows are in the partial result and the checkpoint (a resume does not send them again);
    the unanswered rows stay unfinished (resumable), not failed."""
    df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})
    fn = _RefusedAtRow5()
    sent = fn.sent
    with pytest.raises(dfbatch.RunStoppedError) as stopped:
        dfbatch.process(df, fn, checkpoint=tmp_path, max_in_flight=2, **QUIET)
    partial = stopped.value.partial
    assert partial is not None
    got = dict(zip(partial["text"].to_list(), partial["output"].to_list(), strict=True))
    assert [got[f"row {i}"] for i in (4, 6, 7)] == ["ROW 4", "ROW 6", "ROW 7"]
    assert got["row 5"] is None

    fn.refuse, first = False, len(sent)
    out = dfbatch.process(df, fn, checkpoint=tmp_path, **QUIET)
    resent = sent[first:]
    assert out["output"].to_list() == [f"ROW {i}" for i in range(8)]
    assert not {"row 4", "row 6", "row 7"} & set(resent)  # kept, not paid for twice
    assert "row 5" in resent


@pytest.mark.parametrize("base", ["root", "typo"])
def test_a_wrong_base_url_stops_the_run_instead_of_failing_every_row(make_sim, base) -> None:
    """A base_url without /v1 (or with a typo) answers 404 "Not Found" on every request: not a
    row's fault. It used to be bisected down to each row (3 requests a row) and every row
    stamped failed (a resume then sent none of them); now the run stops at once, resumable,
    with a message naming base_url."""
    sim = make_sim(rpm=None, tpm=None)
    url = sim.url.removesuffix("/v1") if base == "root" else sim.url + "x"
    df = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})
    fn = dfbatch.llm.chat("sim-chat", "{text}", max_tokens=8, base_url=url)
    with pytest.raises(dfbatch.RunStoppedError, match="base_url") as stopped:
        dfbatch.process(df, fn, **QUIET)
    assert "404" in str(stopped.value)
    partial = stopped.value.partial
    assert partial is not None and partial["output"].null_count() == 40


def test_a_404_of_a_rows_own_resource_is_still_that_rows_error() -> None:
    """Only the model APIs' endpoints (no row data in their path) make a 404 run-wide: a 404
    for ``/v1/files/<id>`` (or any path of a user's own API) stays the row's."""
    import httpx

    from dfbatch.execute._retry import classify

    def status_error(status: int, path: str) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "http://api.example" + path)
        response = httpx.Response(status, request=request, text="Not Found")
        return httpx.HTTPStatusError("not found", request=request, response=response)

    assert classify(status_error(404, "/v1/chat/completions")).kind == "fatal_run"
    assert classify(status_error(405, "/openai/deployments/x/embeddings/")).kind == "fatal_run"
    assert classify(status_error(404, "/v1/files/file-abc")).kind == "row"
    assert classify(status_error(404, "/items/42")).kind == "row"
    assert classify(status_error(400, "/v1/chat/completions")).kind == "row"


def test_a_header_sent_twice_is_read_not_dropped() -> None:
    """httpx.Headers (what the openai SDK's errors carry) joins a repeated header's values with
    commas: "2, 3" was no number, so the hint was lost. Now the most careful part counts (the
    longest wait, the smallest remaining); an HTTP date's own comma is still a date."""
    import httpx

    from dfbatch.execute._headers import parse_headers
    from dfbatch.execute._retry import header_items

    def hints(pairs: list[tuple[str, str]]):
        return parse_headers(header_items(httpx.Headers(pairs)), now=0.0)

    assert hints([("retry-after", "2"), ("Retry-After", "3")]).retry_after == 3.0
    assert hints([("retry-after-ms", "100"), ("retry-after-ms", "250")]).retry_after == 0.25
    got = hints([("x-ratelimit-remaining-requests", "7"), ("x-ratelimit-remaining-requests", "5"),
                 ("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-reset-requests", "6m0s")])
    assert (got.remaining_requests, got.reset_requests) == (5.0, 360.0)
    assert hints([("retry-after", "Thu, 01 Jan 1970 00:00:05 GMT")]).retry_after == 5.0
    assert hints([("retry-after", "2, soon")]).retry_after is None  # (a part that is no hint)


@pytest.mark.parametrize("budget", [True, False, None, float("nan"), -0.1, "5%"])
def test_hedge_budget_that_is_no_fraction_is_a_config_error(budget) -> None:
    """``hedge_budget=True`` was taken as 1.0 (every call may be sent twice) without a word."""
    df = pl.DataFrame({"text": ["a"]})

    async def fn(batch: pl.DataFrame) -> list[str]:
        return batch["text"].to_list()

    with pytest.raises(dfbatch.ConfigError, match=r"hedge_budget.*e\.g\. 0\.05"):
        dfbatch.process(df, fn, hedge_budget=budget, progress=False)
