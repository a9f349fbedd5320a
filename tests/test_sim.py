"""The simulated endpoint over real HTTP: content, usage, limits and headers, faults, stats."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from dfbatch.errors import ConfigError
from dfbatch.sim import SimConfig, serve
from dfbatch.sim.content import answer_text
from dfbatch.sim.embedding import embed_texts
from dfbatch.sim.latency import Dice
from dfbatch.sim.tokenizer import encoder_for

DOC = "Polars is a DataFrame library. It is written in Rust and uses Arrow."


def call(url: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    """(status, headers, json body) of one request; errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-chat", "messages": [{"role": "user", "content": content}], **extra}


def test_models_lists_the_configured_models(make_sim):
    server = make_sim(models=("a", "b"))
    status, _, body = call(server.url, "/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["a", "b"]


def test_chat_answer_is_deterministic_with_real_token_usage(sim):
    enc = encoder_for("sim-chat")
    s1, _, b1 = call(sim.url, "/chat/completions", chat_body(f"Summarize: {DOC}"))
    s2, _, b2 = call(sim.url, "/chat/completions", chat_body(f"Summarize: {DOC}"))
    assert s1 == s2 == 200
    text = b1["choices"][0]["message"]["content"]
    assert text == b2["choices"][0]["message"]["content"] == "Polars is a DataFrame library."
    usage = b1["usage"]
    assert usage["completion_tokens"] == len(enc.encode(text))
    # OpenAI's count: 3 per message + role + content, + 3 to prime the reply
    assert usage["prompt_tokens"] == 3 + 3 + 1 + len(enc.encode(f"Summarize: {DOC}"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert b1["choices"][0]["finish_reason"] == "stop"


def test_keyword_instruction_gets_a_keyword_list(sim):
    _, _, body = call(
        sim.url, "/chat/completions", chat_body("List keywords: rust rust arrow polars arrow rust")
    )
    assert body["choices"][0]["message"]["content"] == "rust, arrow, polars"


def test_max_tokens_cuts_the_answer(sim):
    _, _, body = call(sim.url, "/chat/completions", chat_body(f"Summarize: {DOC}", max_tokens=2))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_json_schema_answer_matches_the_schema(sim):
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string"},
            "sentiment": {"enum": ["pos", "neg"]},
            "n_words": {"type": "integer", "maximum": 5},
            "score": {"type": "number", "minimum": 1, "maximum": 2},
            "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "flag": {"type": ["boolean", "null"]},
        },
    }
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    _, _, body = call(sim.url, "/chat/completions", chat_body(f"Tag: {DOC}", response_format=rf))
    value = json.loads(body["choices"][0]["message"]["content"])
    assert set(value) == set(schema["properties"])
    assert value["summary"] == "Polars is a DataFrame library."
    assert value["sentiment"] in ("pos", "neg")
    assert value["n_words"] == 5  # clipped to the maximum
    assert 1 <= value["score"] <= 2
    assert value["keywords"] == ["polars", "dataframe"]
    assert isinstance(value["flag"], bool)


def test_batch_prompt_gets_one_result_per_item_and_drops_marked_items(sim):
    items = [
        {"id": 1, "input": "Summarize: One. Two."},
        {"id": 7, "input": "Summarize: <<drop>> x"},
        {"id": 3, "input": "Summarize: Three."},
    ]
    prompt = "Items:\n" + json.dumps(items)
    _, _, body = call(sim.url, "/chat/completions", chat_body(prompt))
    results = json.loads(body["choices"][0]["message"]["content"])["results"]
    assert results == [{"id": 1, "output": "One."}, {"id": 3, "output": "Three."}]


def test_embeddings_float_and_base64_agree_and_are_stable(sim):
    body = {"model": "sim-embed", "input": ["a cat", "a dog"], "dimensions": 16}
    s1, _, floats = call(sim.url, "/embeddings", body)
    s2, _, b64 = call(sim.url, "/embeddings", {**body, "encoding_format": "base64"})
    assert s1 == s2 == 200
    v = np.array([d["embedding"] for d in floats["data"]], dtype=np.float32)
    w = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]])
    assert v.shape == (2, 16)
    np.testing.assert_allclose(v, w, rtol=1e-6)
    np.testing.assert_allclose(v, embed_texts(["a cat", "a dog"], 16), rtol=1e-6)
    enc = encoder_for("sim-embed")
    assert floats["usage"]["prompt_tokens"] == len(enc.encode("a cat")) + len(enc.encode("a dog"))


def test_rpm_limit_answers_429_with_openai_headers_then_recovers(make_sim):
    server = make_sim(rpm=2, time_scale=0.01)  # 2 requests per 0.6 s
    first = [call(server.url, "/chat/completions", chat_body("hi")) for _ in range(2)]
    assert [s for s, _, _ in first] == [200, 200]
    assert first[0][1]["x-ratelimit-limit-requests"] == "200"  # per real minute: 2 / 0.01
    assert first[0][1]["x-ratelimit-remaining-requests"] == "1"
    assert first[1][1]["x-ratelimit-remaining-requests"] == "0"
    status, headers, body = call(server.url, "/chat/completions", chat_body("hi"))
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 300  # one request refills in 0.3 s
    assert int(headers["retry-after"]) >= 1  # HTTP's header is whole seconds
    assert headers["x-ratelimit-reset-requests"].endswith("ms")
    time.sleep(wait_ms / 1000 + 0.01)
    assert call(server.url, "/chat/completions", chat_body("hi"))[0] == 200
    snap = server.stats.snapshot()
    assert (snap.requests, snap.rate_limited, snap.by_status[200]) == (4, 1, 3)


def test_tpm_charges_prompt_plus_max_tokens(make_sim):
    server = make_sim(tpm=1000, time_scale=1.0, ttft_s=0.0, per_token_s=0.0)
    ok = call(server.url, "/chat/completions", chat_body("hi", max_tokens=600))
    assert ok[0] == 200
    assert (
        int(ok[1]["x-ratelimit-remaining-tokens"]) == 1000 - 600 - ok[2]["usage"]["prompt_tokens"]
    )
    status, headers, body = call(server.url, "/chat/completions", chat_body("hi", max_tokens=600))
    assert status == 429 and body["error"]["type"] == "tokens"
    assert float(headers["retry-after-ms"]) > 0
    status, headers, body = call(server.url, "/chat/completions", chat_body("hi", max_tokens=5000))
    assert status == 429 and "Request too large" in body["error"]["message"]
    assert "retry-after" not in headers  # waiting cannot help


def test_poison_marker_is_a_400(sim):
    status, _, body = call(sim.url, "/chat/completions", chat_body("x <<poison>> y"))
    assert status == 400 and body["error"]["code"] == "poison"
    status, _, _ = call(sim.url, "/embeddings", {"model": "e", "input": ["ok", "<<poison>>"]})
    assert status == 400
    assert sim.stats.snapshot().bad_requests == 2


def test_injected_500(make_sim):
    server = make_sim(error_rate=1.0)
    status, _, body = call(server.url, "/chat/completions", chat_body("x"))
    assert status == 500 and body["error"]["type"] == "server_error"
    assert server.stats.snapshot().server_errors == 1


def test_injected_connection_reset(make_sim):
    server = make_sim(reset_rate=1.0)
    with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
        call(server.url, "/chat/completions", chat_body("x"))
    assert server.stats.snapshot().resets == 1


def test_injected_hang_ends_with_504(make_sim):
    server = make_sim(hang_rate=1.0, hang_s=1.0)  # 10 ms at time_scale 0.01
    status, _, _ = call(server.url, "/chat/completions", chat_body("x"))
    assert status == 504
    assert server.stats.snapshot().hangs == 1


def test_stopping_the_server_wakes_a_hung_request():
    server = serve(hang_rate=1.0, hang_s=3600.0, time_scale=1.0, rpm=None, tpm=None)
    result: list[Any] = []
    with server as url:
        t = threading.Thread(
            target=lambda: result.append(_safe_call(url, "/chat/completions", chat_body("x")))
        )
        t.start()
        while server.stats.snapshot().hangs == 0:
            time.sleep(0.01)
    t.join(timeout=30)
    assert not t.is_alive() and result


def _safe_call(url: str, path: str, body: Any) -> Any:
    try:
        return call(url, path, body)[0]
    except (OSError, http.client.HTTPException) as e:
        return e


def test_api_key_is_checked_when_configured(make_sim):
    server = make_sim(api_key="sk-sim-right")
    assert call(server.url, "/chat/completions", chat_body("x"))[0] == 401
    ok = call(
        server.url,
        "/chat/completions",
        chat_body("x"),
        headers={"Authorization": "Bearer sk-sim-right"},
    )
    assert ok[0] == 200


def test_bad_requests_are_400s(sim):
    assert call(sim.url, "/chat/completions", {"messages": []})[0] == 400
    assert call(sim.url, "/chat/completions", {"model": "m", "messages": []})[0] == 400
    assert call(sim.url, "/chat/completions", chat_body("x", stream=True))[0] == 400
    assert call(sim.url, "/chat/completions", chat_body("x", max_tokens=0))[0] == 400
    assert call(sim.url, "/embeddings", {"model": "m", "input": "x", "dimensions": 0})[0] == 400


def test_stats_record_concurrency_and_windows(make_sim):
    server = make_sim(ttft_s=20.0)  # 0.2 s each: concurrent requests overlap

    threads = [
        threading.Thread(target=call, args=(server.url, "/chat/completions", chat_body(f"q{i}")))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = server.stats.snapshot()
    assert snap.requests == 4 and snap.in_flight == 0
    assert 2 <= snap.max_in_flight <= 4
    frame = server.stats.frame()
    assert frame.height == 4 and frame["status"].to_list() == [200] * 4
    assert server.stats.max_in_window(60.0) == 4
    assert server.stats.max_in_window(60.0, what="tokens") == frame["charged_tokens"].sum()
    status, _, body = call(server.url, "/sim/stats")
    assert status == 200 and body["requests"] == 4 and body["by_status"] == {"200": 4}


def test_async_context_manager_in_a_running_loop():
    async def main() -> tuple[int, str]:
        async with serve(time_scale=0.01, rpm=None) as url:
            status, _, body = await asyncio.to_thread(
                call, url, "/chat/completions", chat_body("Summarize: Hi there. Bye.")
            )
            return status, body["choices"][0]["message"]["content"]

    assert asyncio.run(main()) == (200, "Hi there.")


def test_config_is_validated():
    with pytest.raises(ConfigError, match="rpm"):
        SimConfig(rpm=0)
    with pytest.raises(ConfigError, match="error_rate"):
        SimConfig(error_rate=-0.1)
    with pytest.raises(ConfigError, match=r"did you mean 'tpm'"):
        serve(tmp=3)


def test_latency_model_scales_with_tokens_and_time_scale():
    dice = Dice(
        SimConfig(
            ttft_s=0.2, per_input_token_s=0.001, per_token_s=0.01, tail_prob=0.0, time_scale=0.5
        )
    )
    assert dice.chat_latency(100, 10) == pytest.approx((0.2 + 0.1 + 0.1) * 0.5)
    tail = Dice(SimConfig(ttft_s=1.0, per_token_s=0.0, tail_prob=1.0, tail_factor=4, tail_cap=9))
    draws = [tail.chat_latency(0, 0) for _ in range(200)]
    assert min(draws) >= 4 and max(draws) <= 9 and len(set(draws)) > 1


def test_same_seed_same_faults():
    a, b = Dice(SimConfig(error_rate=0.3, seed=5)), Dice(SimConfig(error_rate=0.3, seed=5))
    assert [a.fault() for _ in range(50)] == [b.fault() for _ in range(50)]


def test_answer_text_of_prompt_without_instruction():
    assert answer_text("Just a sentence here! And more.") == "Just a sentence here!"
