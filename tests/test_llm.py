"""The OpenAI adapters over real HTTP against the local simulator (no network, no real key)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import traceback
from typing import Any

import openai
import polars as pl
import pytest
from pydantic import BaseModel

import dfbatch
from dfbatch.errors import ConfigError, RowError
from dfbatch.execute import _usage
from dfbatch.execute._retry import classify, retry_after
from dfbatch.llm import chat, embed
from dfbatch.sim.content import answer_text
from dfbatch.sim.embedding import embed_texts

DOCS = [
    "Polars is a DataFrame library. It is fast.",
    "Arrow is a columnar format! Many tools use it.",
    "Tokens cost money. Batching saves requests.",
    "Rate limits protect the API. Respect them.",
]
FRAME = pl.DataFrame({"id": [1, 2, 3, 4], "text": DOCS})


def run(fn: Any, batch: pl.DataFrame) -> tuple[Any, _usage.Usage]:
    """Call an async fn directly on a fresh loop, collecting the usage it reports."""

    async def main() -> tuple[Any, _usage.Usage]:
        used, token = _usage.begin()
        try:
            return await fn(batch), used
        finally:
            _usage.end(token)

    return asyncio.run(main())


class Review(BaseModel):
    title: str
    sentiment: str
    n_words: int
    tags: list[str]


def test_chat_per_row_sends_one_request_per_row(make_sim):
    sim = make_sim(rpm=1000)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=40, base_url=sim.url)
    out, used = run(fn, FRAME)
    assert isinstance(out, pl.Series) and out.dtype == pl.String
    assert out.to_list() == [answer_text(f"Summarize: {d}") for d in DOCS]
    assert out.to_list()[0] == "Polars is a DataFrame library."
    snap = sim.stats.snapshot()
    assert snap.by_endpoint == {"chat": 4}
    assert used.input_tokens == snap.prompt_tokens and used.output_tokens == snap.completion_tokens
    assert used.headers is not None and used.headers["x-ratelimit-limit-requests"] == "100000"


def test_prompt_can_use_any_column_and_a_system_message(sim):
    fn = chat("sim-chat", "Summarize: doc {id}. {text}", system="Be brief.", base_url=sim.url)
    out, _ = run(fn, FRAME.head(1))
    assert out.to_list() == ["doc 1."]


def test_batch_mode_is_one_request_with_per_row_answers(sim):
    per_row, _ = run(chat("sim-chat", base_url=sim.url), FRAME)
    before = sim.stats.snapshot().requests
    fn = chat("sim-chat", mode="batch", base_url=sim.url)
    out, used = run(fn, FRAME)
    assert sim.stats.snapshot().requests == before + 1
    assert out.to_list() == per_row.to_list()
    assert used.input_tokens > 0 and used.output_tokens > 0


def test_batch_mode_unmapped_row_fails_alone(sim):
    frame = FRAME.with_columns(
        pl.when(pl.col("id") == 2).then(pl.lit("<<drop>> lost")).otherwise("text").alias("text")
    )
    out, _ = run(chat("sim-chat", mode="batch", base_url=sim.url), frame)
    assert isinstance(out, list)
    assert isinstance(out[1], RowError)
    assert "no result for item 2" in str(out[1]) and "[1, 3, 4]" in str(out[1])
    assert [out[0], out[2], out[3]] == [
        answer_text(f"Summarize: {d}") for d in (DOCS[0], DOCS[2], DOCS[3])
    ]


@pytest.mark.parametrize("mode", ["per_row", "batch"])
def test_structured_output_from_a_json_schema_is_a_struct_column(sim, mode):
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "n_words": {"type": "integer"},
            "keywords": {"type": "array", "items": {"type": "string"}},
        },
    }
    fn = chat("sim-chat", "Summarize: {text}", response_format=schema, mode=mode, base_url=sim.url)
    out, _ = run(fn, FRAME)
    assert out.dtype == pl.Struct(
        {"summary": pl.String, "n_words": pl.Int64, "keywords": pl.List(pl.String)}
    )
    first = out.to_list()[0]
    assert first["summary"] == "Polars is a DataFrame library."
    assert first["n_words"] == len(DOCS[0].split())
    assert first["keywords"][0] == "polars"


@pytest.mark.parametrize("mode", ["per_row", "batch"])
def test_structured_output_from_a_pydantic_model(sim, mode):
    fn = chat("sim-chat", "Review: {text}", response_format=Review, mode=mode, base_url=sim.url)
    out, _ = run(fn, FRAME)
    assert out.struct.fields == ["title", "sentiment", "n_words", "tags"]
    rows = out.to_list()
    assert all(Review.model_validate(r) for r in rows)
    assert rows[1]["title"].startswith("Arrow is a columnar")
    assert fn.dfbatch_fingerprint["response_format"]["json_schema"]["name"] == "Review"


def test_structured_output_through_process_keeps_the_struct_dtype(sim):
    fn = chat("sim-chat", "Review: {text}", response_format=Review, base_url=sim.url)
    out = dfbatch.process(FRAME, fn, items_per_batch=2, progress=False)
    assert out["output"].dtype.fields[2].dtype == pl.Int64  # type: ignore[attr-defined]
    assert out["error"].null_count() == 4
    assert out.unnest("output")["n_words"].to_list() == [len(d.split()) for d in DOCS]


def test_embeddings_one_request_per_batch_float32_lists(sim):
    frame = pl.DataFrame({"text": ["a cat sat", "a dog ran", None, "a cat ran"]})
    fn = embed("sim-embed", dimensions=32, base_url=sim.url)
    out, used = run(fn, frame)
    assert sim.stats.snapshot().by_endpoint == {"embeddings": 1}
    assert isinstance(out, list) and isinstance(out[2], RowError)
    series = pl.Series([o if not isinstance(o, RowError) else None for o in out])
    assert series.dtype == pl.List(pl.Float32)
    expected = embed_texts(["a cat sat", "a dog ran", "a cat ran"], 32)
    got = [out[i].to_numpy() for i in (0, 1, 3)]
    for g, e in zip(got, expected, strict=True):
        assert g.tolist() == pytest.approx(e.tolist(), rel=1e-6)
    assert used.input_tokens == sim.stats.snapshot().prompt_tokens > 0


def test_embed_template_and_full_batch_series(sim):
    fn = embed("sim-embed", "{id}: {text}", base_url=sim.url)
    out, _ = run(fn, FRAME)
    assert isinstance(out, pl.Series) and out.dtype == pl.List(pl.Float32)
    assert out.list.len().to_list() == [256] * 4  # the simulator's default size


def test_rate_limit_error_carries_retry_after(make_sim):
    server = make_sim(rpm=1)
    fn = chat("sim-chat", base_url=server.url)
    run(fn, FRAME.head(1))
    with pytest.raises(openai.RateLimitError) as info:
        run(fn, FRAME.slice(1, 1))
    exc = info.value
    assert exc.status_code == 429
    assert int(exc.response.headers["retry-after-ms"]) > 0
    decision = classify(exc)
    assert decision.retry and decision.rate_limited
    assert retry_after(exc) == pytest.approx(int(exc.response.headers["retry-after-ms"]) / 1000)


def test_per_row_retry_does_not_resend_rows_that_succeeded(make_sim):
    server = make_sim(rpm=3)  # a 4-row batch: 3 answers, then a 429
    fn = chat("sim-chat", base_url=server.url)
    with pytest.raises(openai.RateLimitError) as info:
        run(fn, FRAME)
    assert server.stats.snapshot().by_status == {200: 3, 429: 1}
    asyncio.run(asyncio.sleep(retry_after(info.value) or 0.0))
    out, _ = run(fn, FRAME)
    assert out.to_list() == [answer_text(f"Summarize: {d}") for d in DOCS]
    assert server.stats.snapshot().by_status == {200: 4, 429: 1}


def test_server_error_propagates_as_retryable(make_sim):
    server = make_sim(error_rate=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        run(chat("sim-chat", base_url=server.url), FRAME.head(2))
    assert info.value.status_code == 500 and classify(info.value).retry


def test_connection_reset_propagates_as_retryable(make_sim):
    server = make_sim(reset_rate=1.0)
    with pytest.raises(openai.APIConnectionError) as info:
        run(embed("sim-embed", base_url=server.url), FRAME.head(2))
    assert classify(info.value).retry


def test_poison_row_fails_alone_in_per_row_mode(sim):
    frame = FRAME.with_columns(pl.Series("text", [DOCS[0], "bad <<poison>>", DOCS[2], DOCS[3]]))
    out, _ = run(chat("sim-chat", base_url=sim.url), frame)
    assert isinstance(out[1], RowError) and "HTTP 400" in str(out[1]) and "poison" in str(out[1])
    assert [o for i, o in enumerate(out) if i != 1] == [
        answer_text(f"Summarize: {d}") for d in (DOCS[0], DOCS[2], DOCS[3])
    ]


def test_poison_in_batch_mode_raises_a_non_retryable_400(sim):
    frame = FRAME.with_columns(pl.Series("text", [DOCS[0], "bad <<poison>>", DOCS[2], DOCS[3]]))
    with pytest.raises(openai.BadRequestError) as info:
        run(chat("sim-chat", mode="batch", base_url=sim.url), frame)
    assert not classify(info.value).retry


def test_missing_column_is_a_config_error_with_a_hint(sim):
    fn = chat("sim-chat", "Summarize: {txt}", base_url=sim.url)
    with pytest.raises(ConfigError, match=r"\{txt\}.*did you mean 'text'"):
        run(fn, FRAME)


def test_arguments_are_validated():
    with pytest.raises(ConfigError, match="mode"):
        chat("m", mode="rows", base_url="http://localhost:1/v1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_tokens"):
        chat("m", max_tokens=0, base_url="http://localhost:1/v1")
    with pytest.raises(ConfigError, match="placeholders must name a column"):
        chat("m", "Summarize: {}", base_url="http://localhost:1/v1")
    with pytest.raises(ConfigError, match="response_format"):
        chat("m", response_format=["x"], base_url="http://localhost:1/v1")
    with pytest.raises(ConfigError, match="dimensions"):
        embed("m", dimensions=0, base_url="http://localhost:1/v1")


def test_no_key_and_no_endpoint_is_a_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        chat("gpt-4o-mini")


def test_fingerprint_and_output_tokens():
    fn = chat(
        "m",
        "Q: {text}",
        system="S",
        max_tokens=50,
        temperature=0.0,
        base_url="http://localhost:1/v1",
        api_key="sk-test-fingerprint-secret",
    )
    assert fn.dfbatch_output_tokens == 50
    assert fn.dfbatch_fingerprint == {
        "kind": "chat",
        "mode": "per_row",
        "model": "m",
        "prompt": "Q: {text}",
        "system": "S",
        "max_tokens": 50,
        "temperature": 0.0,
        "response_format": None,
        "extra_body": {},
    }
    batch = chat("m", mode="batch", max_tokens=50, base_url="http://localhost:1/v1")
    assert batch.dfbatch_output_tokens > 50  # the JSON wrapper of each answer costs tokens too
    assert embed("e", base_url="http://localhost:1/v1").dfbatch_fingerprint["kind"] == "embed"


SECRET = "sk-test-DO-NOT-LEAK-4242424242"


def _texts_of(exc: BaseException) -> str:
    request = getattr(exc, "request", None)
    return "\n".join(
        [
            str(exc),
            repr(exc),
            str(getattr(exc, "message", "")),
            str(getattr(exc, "body", "")),
            str(dict(request.headers) if request is not None else ""),
            "".join(traceback.format_exception(exc)),
        ]
    )


@pytest.mark.parametrize("mode", ["per_row", "batch"])
def test_api_key_never_appears_in_errors_or_reprs(make_sim, mode):
    server = make_sim(api_key="sk-the-right-one")  # echoes a wrong key in its 401 message
    fn = chat("sim-chat", base_url=server.url, api_key=SECRET, mode=mode)
    with pytest.raises(openai.AuthenticationError) as info:
        run(fn, FRAME.head(2))
    text = _texts_of(info.value)
    assert "[redacted]" in text and "Incorrect API key provided" in text
    assert SECRET not in text
    assert SECRET not in repr(fn) and SECRET not in str(fn.dfbatch_fingerprint)
    with pytest.raises(dfbatch.RunStoppedError) as stopped:  # a refused key stops the run
        dfbatch.process(FRAME.head(2), fn, progress=False, max_attempts=1)
    assert "[redacted]" in str(stopped.value) and SECRET not in str(stopped.value)
    partial = stopped.value.partial
    assert partial is not None and not any(SECRET in e for e in partial["error"].to_list())


def test_api_key_from_the_environment_never_leaks(make_sim, monkeypatch):
    server = make_sim(api_key="sk-the-right-one")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fn = embed("sim-embed", base_url=server.url)
    with pytest.raises(openai.AuthenticationError) as info:
        run(fn, FRAME.head(1))
    assert SECRET not in _texts_of(info.value)


def test_right_key_is_accepted(make_sim):
    server = make_sim(api_key="sk-the-right-one")
    out, _ = run(chat("sim-chat", base_url=server.url, api_key="sk-the-right-one"), FRAME.head(1))
    assert out.to_list() == ["Polars is a DataFrame library."]


def test_a_given_client_is_used_without_sdk_retries(sim):
    async def main() -> tuple[Any, int]:
        client = openai.AsyncOpenAI(base_url=sim.url, api_key="sk-local", max_retries=5)
        try:
            fn = chat("sim-chat", client=client)
            return await fn(FRAME.head(1)), client.max_retries
        finally:
            await client.close()

    out, retries = asyncio.run(main())
    assert out.to_list() == ["Polars is a DataFrame library."] and retries == 5


def test_import_dfbatch_does_not_import_openai_or_aiohttp():
    code = (
        "import sys, dfbatch, dfbatch.llm, dfbatch.sim; "
        "print(sorted(m for m in ('openai', 'aiohttp') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"
