"""A run stopped by the provider, broken on purpose: each test pins a fix (see its docstring)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

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
    retry_after = 0.5  # (a retry never goes out before the refusal: backoff's jitter is >= 0)


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


async def _refused(df: pl.DataFrame, fn: Any, **options: Any) -> pl.DataFrame:
    """The partial result of a run the refusal of its key stopped."""
    with pytest.raises(dfbatch.RunStoppedError, match="API key was refused") as stopped:
        await dfbatch.aprocess(df, fn, **options, **QUIET)
    assert stopped.value.partial is not None
    return stopped.value.partial


@pytest.mark.parametrize("a_first", [False, True])
def test_answers_of_a_batch_cut_off_in_its_retry_by_a_refusal_are_kept(
        tmp_path: Path, a_first: bool) -> None:
    """A batch whose try failed with a transient error after some rows were answered (paid
    for) is retried; when a refusal stops the run before the retry, the answers were dropped
    (only a run-stopping error of the batch's own kept them): a resume paid for them again."""
    from benchmarks.simapi import run

    fn = _RetriedWhileRefused(a_first)
    df = pl.DataFrame({"text": [f"row {i}" for i in range(8)]})

    partial = run(_refused(df, fn, checkpoint=tmp_path, items_per_batch=4, agents=2,
                           backoff_base=1.0))
    assert partial["output"].to_list() == ["ROW 0", "ROW 1", "ROW 2"] + [None] * 5
    fn.refuse = False
    out = dfbatch.process(df, fn, checkpoint=tmp_path, items_per_batch=4, **QUIET)
    assert out["output"].to_list() == [f"ROW {i}" for i in range(8)]
    assert sorted(fn.sent) == sorted([f"row {i}" for i in range(8)])  # none paid for twice


def test_a_refusal_in_one_chunk_drains_the_other_chunks_calls_in_flight(tmp_path: Path) -> None:
    """Streaming (chunks share the limits): a refusal in the first chunk, while the next
    chunk's calls (sent before it: paid for) are in flight. Those were cancelled at once when
    the first chunk's pool had drained (the stream stopped every pool); now they are drained
    too: their answers are in the output file. (The real clock: the virtual one jumps while
    the next chunk is planned in a thread.)"""
    sent: list[str] = []
    second_chunk_sent = asyncio.Event()

    async def fn(batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()
        sent.extend(texts)
        i = int(texts[0].split()[1])
        if i == 7:
            second_chunk_sent.set()
        if i == 0:  # refused once the second chunk's calls are all out
            await second_chunk_sent.wait()
            await asyncio.sleep(0.05)
            raise _Refused(REFUSED)
        await asyncio.sleep(0.01 if i < 4 else 0.3)
        return [t.upper() for t in texts]

    out = tmp_path / "out.parquet"
    df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})

    async def main() -> None:
        with pytest.raises(dfbatch.RunStoppedError, match="API key was refused"):
            await dfbatch.aprocess(df.lazy(), fn, out=out, chunk_rows=4, items_per_batch=1,
                                   agents=4, **QUIET)

    asyncio.run(main())
    got = dict(pl.read_parquet(out).select("text", "output").rows())
    assert sorted(sent) == [f"row {i}" for i in range(8)]  # (the third chunk: never sent)
    assert [got[t] for t in sent] == [None] + [t.upper() for t in sent[1:]]


def test_a_call_that_cleans_up_after_its_refusal_keeps_its_answers() -> None:
    """The breaker's stop (from inside fn: the refused request) drains the pool; the call that
    got the refusal is not done until fn returns (here it closes a client first): its
    verdict, with the rows it had answered, must still be recorded, and the run stopped."""
    from benchmarks.simapi import run

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        texts, out = batch["text"].to_list(), []
        for text in texts:
            try:
                async with dfbatch.limits.request():
                    await asyncio.sleep(0.01)
                    if text == "row 2":
                        raise _Refused(REFUSED)
                    out.append(text.upper())
            except _Refused as exc:
                await asyncio.sleep(0.05)  # (closing a client ...)
                answered = [i < len(out) for i in range(len(texts))]
                raise attach_partial(exc, Partial(out + [None] * (len(texts) - len(out)),
                                                  answered)) from None
        return out

    partial = run(_refused(pl.DataFrame({"text": [f"row {i}" for i in range(4)]}), fn,
                           items_per_batch=4, agents=1))
    assert partial["output"].to_list() == ["ROW 0", "ROW 1", None, None]
    assert partial["error"].to_list() == [None, None, "cancelled", "cancelled"]


def test_a_refusal_fn_keeps_to_itself_still_stops_the_run_with_its_message() -> None:
    """An fn that turns every request's error into a row error: the refusal stops the breaker
    (no request goes out after it) and the run drains; it must end with RunStoppedError
    naming the cause, not a bare 'rows unfinished' warning."""
    from benchmarks.simapi import run

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[object]:
        out: list[object] = []
        for text in batch["text"].to_list():
            try:
                async with dfbatch.limits.request():
                    await asyncio.sleep(0.01)
                    if text == "row 2":
                        raise _Refused(REFUSED)
                    out.append(text.upper())
            except Exception as exc:  # (the point of the test)
                out.append(dfbatch.RowError(str(exc)))
        return out

    partial = run(_refused(pl.DataFrame({"text": [f"row {i}" for i in range(40)]}), fn,
                           items_per_batch=4, agents=1))
    errors = partial["error"].to_list()
    assert errors.count("cancelled") >= 8  # (the batches not started when it was refused)
    assert all(e is None or e == "cancelled" or REFUSED in e for e in errors)


def test_the_refusal_of_a_key_is_redacted_in_the_message_whichever_batch_reports_it() -> None:
    """dfbatch.llm.chat (per row) redacted the key from the error it raised only when its
    batch's rows were all back; the breaker had stopped with the refusal meanwhile, and a
    batch sitting out a backoff got a copy of it (the key still in its words): its verdict
    came first and became the RunStoppedError's message, key and all. The refusal is now
    redacted as it leaves its request, before any copy is made."""
    import json

    import httpx
    import openai

    import dfbatch.llm

    key = "sk-secret-0123456789abcdef"

    async def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        if text == "row 0":  # its batch backs off for 5 s (answered: row 1)
            await asyncio.sleep(0.02)
            return httpx.Response(429, headers={"retry-after": "5"}, json={"error": {
                "message": "Rate limit reached", "code": "rate_limit_exceeded"}})
        if text == "row 2":  # while another row of its batch is still in flight
            await asyncio.sleep(0.1)
            return httpx.Response(401, json={"error": {
                "message": f"Incorrect API key provided: {key}.", "code": "invalid_api_key"}})
        await asyncio.sleep(0.3 if text == "row 3" else 0.02)
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text.upper()}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})

    async def main() -> dfbatch.RunStoppedError:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = openai.AsyncOpenAI(api_key=key, base_url="http://api.test/v1",
                                    http_client=http)
        fn = dfbatch.llm.chat("m", "{text}", client=client, max_tokens=8)
        df = pl.DataFrame({"text": [f"row {i}" for i in range(4)]})
        with pytest.raises(dfbatch.RunStoppedError) as stopped:
            await dfbatch.aprocess(df, fn, items_per_batch=2, agents=2, **QUIET)
        return stopped.value

    stopped = asyncio.run(main())
    assert "API key was refused" in str(stopped) and "[redacted]" in str(stopped)
    assert key not in str(stopped)
    assert stopped.partial is not None
    assert stopped.partial["output"].to_list() == [None, "ROW 1", None, "ROW 3"]


class _Forbidden(Exception):
    status_code = 403


def test_the_message_names_the_error_that_stopped_the_run_not_a_later_one() -> None:
    """A 401 stops the run (its request's error stops the breaker at once) while its fn
    still cleans up; a call sent before it is refused with a 403 and is back first. The
    message named the 403 (the first verdict recorded): fixing the model's permissions and
    resuming met the bad key. It names the 401 now."""
    from benchmarks.simapi import run

    @dfbatch.limits.per_request
    async def fn(batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()
        if texts == ["row 0"]:
            try:
                async with dfbatch.limits.request():
                    await asyncio.sleep(0.1)
                    raise _Refused(REFUSED)
            finally:
                await asyncio.sleep(0.3)  # (closing a client ...)
        if texts == ["row 1"]:
            async with dfbatch.limits.request():
                await asyncio.sleep(0.2)
                msg = "You are not allowed to sample from this model"
                raise _Forbidden(msg)
        await asyncio.sleep(0.05)
        return [t.upper() for t in texts]

    async def main() -> None:
        df = pl.DataFrame({"text": [f"row {i}" for i in range(4)]})
        with pytest.raises(dfbatch.RunStoppedError, match=r"API key was refused.*HTTP 401"):
            await dfbatch.aprocess(df, fn, items_per_batch=1, agents=4, **QUIET)

    run(main())


def _litellm_error(status: int, kind: str, message: str, type_: str,
                   headers: dict[str, str] | None = None) -> Exception:
    """The openai SDK's error for what a LiteLLM proxy (1.108.7) answers when its upstream
    failed: the upstream's words in the message, its own type and the status as code."""
    import httpx
    import openai

    request = httpx.Request("POST", "http://proxy.test/v1/chat/completions")
    body = {"error": {"message": f"litellm.{kind}: {kind}: OpenAIException - {message}\n\n"
                                 "LiteLLM: model group 'chat' failed with the error above. "
                                 "No fallback was attempted.",
                      "type": type_, "param": None, "code": str(status)}}
    response = httpx.Response(status, json=body, headers=headers or {}, request=request)
    client = openai.OpenAI(api_key="sk-test", base_url="http://proxy.test/v1")
    return client._make_status_error(body["error"]["message"], body=body["error"],
                                     response=response)


def test_what_a_litellm_proxy_forwards_is_classified_as_the_upstream_meant() -> None:
    """Behind LiteLLM, an upstream out of quota (429 insufficient_quota) comes back as a 429
    "throttling_error" without its code: it was a rate limit, sat out for outage_timeout
    (600 s) before the run stopped saying every call was rate-limited. An upstream that does
    not answer comes back as LiteLLM's 408 (its timeout): not an outage, so the breaker never
    opened and every row failed after its tries. A 429 of a per-minute limit in the same words
    (Gemini) but with a wait stays a rate limit."""
    from dfbatch.execute._retry import classify

    quota = _litellm_error(429, "RateLimitError", "You exceeded your current quota, please "
                           "check your plan and billing details.", "throttling_error")
    assert (classify(quota).kind, classify(quota).cause) == ("fatal_run", "quota")
    hung = _litellm_error(408, "Timeout", "Request timed out. - timeout value=5.0",
                          "invalid_request_error")
    assert classify(hung).outage and classify(hung).cause == "timeout"
    per_minute = _litellm_error(429, "RateLimitError", "You exceeded your current quota. "
                                "Please retry in 23.5s.", "throttling_error")
    assert classify(per_minute).kind == "rate_limited"
    hinted = _litellm_error(429, "RateLimitError", "You exceeded your current quota",
                            "throttling_error", {"llm_provider-retry-after": "20"})
    assert classify(hinted).kind == "rate_limited"
    limited = _litellm_error(429, "RateLimitError", "Rate limit reached for requests",
                             "throttling_error")
    assert classify(limited).kind == "rate_limited"
