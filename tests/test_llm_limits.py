"""The adapters charge the run's limits per HTTP request, with the provider's own token count,
report every row's usage once, and check the embeddings' shape (real HTTP: ``dfbatch.sim``)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import polars as pl
import pytest

from dfbatch.errors import OutputError, RowError
from dfbatch.execute import _usage
from dfbatch.execute._charge import bind_run_limits, charges_per_request, one_request_per_call
from dfbatch.execute._limits import Cost, Outcome
from dfbatch.execute._retry import retry_after
from dfbatch.llm import chat, embed
from tests.test_llm import DOCS, FRAME


class Spy:
    """A limit that records every charge and how it ended."""

    def __init__(self) -> None:
        self.costs: list[Cost] = []
        self.outcomes: list[Outcome | None] = []

    async def acquire(self, cost: Cost) -> None:
        self.costs.append(cost)

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        self.outcomes.append(outcome)


def run_bound(fn: Any, batch: pl.DataFrame, spy: Spy | None = None) -> tuple[Any, _usage.Usage]:
    """Call fn on a fresh loop as a run would: usage collected, limits bound (if ``spy``)."""

    async def main() -> tuple[Any, _usage.Usage]:
        used, token = _usage.begin()
        try:
            if spy is None:
                return await fn(batch), used
            with bind_run_limits(spy):
                return await fn(batch), used
        finally:
            _usage.end(token)

    return asyncio.run(main())


def test_adapters_say_how_they_charge(sim):
    per_row = chat("sim-chat", base_url=sim.url)
    batch = chat("sim-chat", mode="batch", base_url=sim.url)
    vectors = embed("sim-embed", base_url=sim.url)
    assert all(charges_per_request(f) for f in (per_row, batch, vectors))
    assert not one_request_per_call(per_row)  # a bigger batch is more requests
    assert one_request_per_call(batch) and one_request_per_call(vectors)
    assert one_request_per_call(lambda b: b)  # a plain fn: charged per call, as before


def test_per_row_chat_charges_each_request_what_the_provider_charges(make_sim):
    sim = make_sim(rpm=10_000, tpm=10_000_000)  # limits high enough never to bind: headers
    spy = Spy()
    fn = chat("sim-chat", "Summarize: {text}", system="Be brief.", max_tokens=40,
              base_url=sim.url)
    _, used = run_bound(fn, FRAME, spy)
    snap = sim.stats.snapshot()
    assert len(spy.costs) == snap.requests == 4
    # the simulator charges its TPM with prompt tokens (OpenAI's count) + max_tokens
    assert sum(c.tokens for c in spy.costs) == snap.prompt_tokens + 4 * 40
    assert all(c.requests == 1 for c in spy.costs)
    assert all(o is not None and o.ok and o.hints is not None for o in spy.outcomes)
    assert sum(o.actual_tokens for o in spy.outcomes if o) == used.input_tokens + used.output_tokens


def test_batch_chat_and_embed_charge_one_request(make_sim):
    spy = Spy()
    server = make_sim()
    run_bound(chat("sim-chat", mode="batch", max_tokens=20, base_url=server.url), FRAME, spy)
    snap = server.stats.snapshot()
    assert len(spy.costs) == snap.requests == 1
    assert spy.costs[0].tokens >= snap.prompt_tokens + 4 * 20  # the whole output budget
    server = make_sim()
    run_bound(embed("sim-embed", base_url=server.url), FRAME, spy)
    snap = server.stats.snapshot()
    assert len(spy.costs) == 2 and snap.requests == 1
    assert spy.costs[1].tokens == snap.prompt_tokens  # exactly what the provider counts


def test_a_429_reaches_the_limits_with_its_hint(make_sim):
    server = make_sim(rpm=3)  # a 4-row batch: 3 answers, then a 429
    spy = Spy()
    with pytest.raises(openai.RateLimitError) as info:
        run_bound(chat("sim-chat", base_url=server.url), FRAME, spy)
    limited = [o for o in spy.outcomes if o is not None and o.rate_limited]
    assert len(limited) == 1 and limited[0].retry_after == pytest.approx(retry_after(info.value))
    assert limited[0].hints is not None and limited[0].hints.remaining_requests == 0


def test_rows_kept_from_a_failed_attempt_are_reported_when_the_batch_succeeds(make_sim):
    server = make_sim(rpm=3)
    fn = chat("sim-chat", base_url=server.url)
    with pytest.raises(openai.RateLimitError) as info:
        run_bound(fn, FRAME)
    asyncio.run(asyncio.sleep(retry_after(info.value) or 0.0))
    _, used = run_bound(fn, FRAME)
    snap = server.stats.snapshot()
    assert snap.by_status == {200: 4, 429: 1}
    assert used.input_tokens == snap.prompt_tokens  # all 4 rows, 3 of them from the 1st try
    assert used.output_tokens == snap.completion_tokens


def _mock_embeddings(vectors_for: Any) -> openai.AsyncOpenAI:
    """A client whose embeddings endpoint answers ``vectors_for(inputs)`` vectors."""

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        inputs = json.loads(request.content)["input"]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, 0.25]}
                for i in vectors_for(inputs)]
        return httpx.Response(200, json={"object": "list", "data": data, "model": "m",
                                         "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return openai.AsyncOpenAI(api_key="sk-mock", base_url="http://mock.invalid/v1",
                              http_client=http, max_retries=0)


def test_embed_refuses_a_wrong_number_of_vectors():
    fn = embed("m", client=_mock_embeddings(lambda inputs: [0]))
    with pytest.raises(OutputError, match="1 vectors for 4 inputs"):
        run_bound(fn, FRAME)


def test_embed_refuses_duplicate_indices():
    fn = embed("m", client=_mock_embeddings(lambda inputs: [0, 0, 1, 2]))
    with pytest.raises(OutputError, match=r"indices \[0, 0, 1, 2\]"):
        run_bound(fn, FRAME)


def test_an_empty_text_never_mislabels_a_neighbour():
    frame = FRAME.with_columns(pl.Series("text", [DOCS[0], "", DOCS[2], DOCS[3]]))
    short = embed("m", client=_mock_embeddings(lambda inputs: range(len(inputs) - 1)))
    with pytest.raises(OutputError, match="2 vectors for 3 inputs"):
        run_bound(short, frame)
    right = embed("m", client=_mock_embeddings(lambda inputs: range(len(inputs))))
    out, _ = run_bound(right, frame)
    assert [isinstance(v, RowError) for v in out] == [False, True, False, False]
    assert "empty text" in str(out[1])
