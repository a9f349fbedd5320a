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

REFUSED = "Incorrect API key provided"
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


def test_batches_stopped_by_one_refusal_keep_their_own_answers() -> None:
    """Every batch the breaker stops got the *same* exception object, and each batch's fn
    attaches the answers it got to the error it raises: the last to attach won, and a batch
    that read later took another batch's answers (same length: no check could tell) -- a
    silently wrong output, and an answer for the refused row. Each stopped call now gets its
    own copy of the run-stopping error."""

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()

        async def one(text: str) -> str:
            # the other rows are answered first; row 7 asks after the refusal of row 2
            await asyncio.sleep({"row 2": 0.05, "row 7": 0.06}.get(text, 0.0))
            async with dfbatch.limits.request():
                if text == "row 2":
                    raise _Refused(REFUSED)
                await asyncio.sleep(0.01)
                return text.upper()

        got = await asyncio.gather(*(one(t) for t in texts), return_exceptions=True)
        failure = next(g for g in got if isinstance(g, BaseException))
        answered = [isinstance(g, str) for g in got]
        attach_partial(failure, Partial([g if ok else None for g, ok in zip(got, answered,
                                                                              strict=True)],
                                        answered))
        if "row 0" in texts:
            await asyncio.sleep(0.05)  # (closing a client ...) while the other batch reads
        raise failure

    df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})
    with pytest.raises(dfbatch.RunStoppedError) as stopped:
        dfbatch.process(df, fn, agents=4, **QUIET)
    partial = stopped.value.partial
    assert partial is not None
    got = dict(zip(partial["text"].to_list(), partial["output"].to_list(), strict=True))
    for i in (0, 1, 3, 4, 5, 6):  # answered before the refusal: their own answers
        assert got[f"row {i}"] in (f"ROW {i}", None)
    assert got["row 2"] is None and got["row 7"] is None
    assert sum(v is not None for v in got.values()) == 6, (got, partial["error"].to_list())


@pytest.mark.parametrize("per_request", [True, False])
def test_a_refusal_ends_every_wait_for_the_limits_and_keeps_the_answers_in_flight(
        per_request: bool) -> None:
    """A run stopped by a refusal drains: the calls already sent bring their answers back
    (kept), while the batches waiting for a bucket (rpm=60: one a second) give up at once --
    not one bucket turn after another, for up to DRAIN_S."""
    from benchmarks.simapi import run

    sent: list[str] = []

    async def answer(text: str) -> str:
        sent.append(text)
        if len(sent) == 2:  # the second request, at 1 s, is refused at 1.1 s
            await asyncio.sleep(0.1)
            raise _Refused(REFUSED)
        await asyncio.sleep(1.5)  # the first is answered at 1.5 s
        return text.upper()

    @dfbatch.limits.per_request
    async def per_row(batch: pl.DataFrame) -> list[str]:
        async def one(text: str) -> str:
            async with dfbatch.limits.request():
                return await answer(text)

        return list(await asyncio.gather(*(one(t) for t in batch["text"])))

    async def per_call(batch: pl.DataFrame) -> list[str]:
        return [await answer(t) for t in batch["text"]]

    async def main() -> tuple[float, pl.DataFrame]:
        t0 = asyncio.get_running_loop().time()
        df = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})
        with pytest.raises(dfbatch.RunStoppedError) as stopped:
            await dfbatch.aprocess(df, per_row if per_request else per_call, rpm=60,
                                   agents=4, progress=False, items_per_batch=1,
                                   hedge_after=None)
        return asyncio.get_running_loop().time() - t0, stopped.value.partial

    elapsed, partial = run(main())
    # the answer in flight is back at 1.5 s; the third request's turn (2 s) is not waited for
    assert 1.5 <= elapsed < 1.9
    answered = partial.filter(pl.col("output").is_not_null())
    assert answered["text"].to_list() == sent[:1]
    assert answered["output"].to_list() == [sent[0].upper()]
    assert partial.filter(pl.col("text") == sent[1])["output"].to_list() == [None]
    assert len(sent) == 2
