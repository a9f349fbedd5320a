"""Who is at fault for a failed call: rows, the service, the rate limit, or the whole account."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from dfbatch.errors import FatalError, OutputError, RetryableError
from dfbatch.execute._retry import classify, fatal_message, parse_retry_after, retry_after

REQUEST = httpx.Request("POST", "http://sim.invalid/v1/chat/completions")


def api_error(status: int, code: str | None = None, type_: str | None = None,
              message: str = "boom", headers: dict[str, str] | None = None) -> Exception:
    """A real openai SDK error, as the SDK builds it from a response."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    response = httpx.Response(status, json=body, headers=headers or {}, request=REQUEST)
    client = openai.OpenAI(api_key="sk-test", base_url="http://sim.invalid/v1")
    return client._make_status_error(message, body=body["error"], response=response)


class Plain(Exception):
    def __init__(self, status: int, text: str = "") -> None:
        super().__init__(text)
        self.status = status  # aiohttp's ClientResponseError spells it so


CASES: list[tuple[str, Any, str, str | None, bool]] = [
    # (id, exception, kind, cause, bisect)
    ("400", api_error(400, message="Invalid content"), "row", "bad_request", True),
    ("413", api_error(413), "row", "bad_request", True),
    ("422", Plain(422), "row", "bad_request", True),
    ("401", api_error(401, "invalid_api_key"), "fatal_run", "auth", False),
    ("403", api_error(403, "model_not_allowed"), "fatal_run", "permission", False),
    ("404-model", api_error(404, "model_not_found", message="The model `x` does not exist"),
     "fatal_run", "model_not_found", False),
    ("404-other", Plain(404, "no such document"), "row", "bad_request", True),
    ("402", Plain(402, "payment required"), "fatal_run", "quota", False),
    ("quota", api_error(429, "insufficient_quota", "insufficient_quota",
                        "You exceeded your current quota"), "fatal_run", "quota", False),
    ("429", api_error(429, "rate_limit_exceeded", "tokens", "Rate limit reached"),
     "rate_limited", "rate_limit", False),
    ("429-litellm", api_error(429, "429", "None", "Rate limit exceeded for api_key: sim"),
     "rate_limited", "rate_limit", False),
    ("429-bare", Plain(429), "rate_limited", "rate_limit", False),
    ("429-overload", api_error(429, "engine_overloaded", "server_error",
                               "The engine is currently overloaded"), "transient", "overload",
     False),
    ("429-too-large", api_error(429, "rate_limit_exceeded", "tokens",
                                "Request too large for gpt-4 on tokens per min"),
     "row", "bad_request", True),
    ("500", api_error(500, type_="server_error"), "transient", "server", False),
    ("503-overload", api_error(503, "overloaded", message="Service overloaded"), "transient",
     "overload", False),
    ("504", Plain(504), "transient", "server", False),
    ("408", Plain(408), "transient", "timeout", False),  # (an outage, as a timeout is)
    ("conn", openai.APIConnectionError(request=REQUEST), "transient", "connection", False),
    ("sdk-timeout", openai.APITimeoutError(request=REQUEST), "transient", "timeout", False),
    ("httpx-connect", httpx.ConnectError("refused"), "transient", "connection", False),
    ("httpx-read-timeout", httpx.ReadTimeout("slow"), "transient", "timeout", False),
    ("os-conn", ConnectionResetError("reset"), "transient", "connection", False),
    ("timeout", TimeoutError(), "transient", "timeout", False),
    ("retryable", RetryableError("busy"), "transient", None, False),
    ("retryable-rate", RetryableError("rate limit hit"), "rate_limited", None, False),
    ("fatal", FatalError("no"), "row", None, True),
    ("output", OutputError("3 outputs for 4 rows"), "row", "output", False),
    ("fn-bug", KeyError("x"), "row", None, True),
]


@pytest.mark.parametrize(("exc", "kind", "cause", "bisect"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_classify(exc, kind, cause, bisect):
    d = classify(exc)
    assert (d.kind, d.cause, d.bisect) == (kind, cause, bisect)
    assert d.retry == (kind in ("transient", "rate_limited"))
    assert d.rate_limited == (kind == "rate_limited")


def test_outage_is_what_a_breaker_counts():
    assert classify(openai.APIConnectionError(request=REQUEST)).outage
    assert classify(api_error(502)).outage
    assert not classify(api_error(429, "rate_limit_exceeded")).outage
    assert not classify(api_error(429, "engine_overloaded", "server_error")).outage
    assert classify(api_error(429, "engine_overloaded", "server_error")).overloaded


def test_hints_come_with_the_decision():
    exc = api_error(429, "rate_limit_exceeded", headers={
        "retry-after": "1", "retry-after-ms": "250", "x-ratelimit-remaining-requests": "0"})
    d = classify(exc)
    assert d.retry_after == 0.25 and d.hints.remaining_requests == 0
    litellm = api_error(429, "429", headers={"llm_provider-retry-after": "60"})
    assert classify(litellm).retry_after == 60.0 == retry_after(litellm)
    assert classify(RetryableError("x", retry_after=2.0)).retry_after == 2.0
    assert classify(api_error(401, headers={"retry-after": "5"})).retry_after is None
    assert parse_retry_after({"Retry-After": "3"}) == 3.0


def test_retry_on_overrides_both_ways():
    exc = api_error(400)
    assert classify(exc, lambda e: True).kind == "transient"
    d = classify(api_error(500), lambda e: False)
    assert (d.kind, d.retry, d.bisect) == ("row", False, True)
    assert classify(api_error(500), lambda e: None).kind == "transient"


def test_fatal_message_names_cause_and_fix():
    text = fatal_message(api_error(401, "invalid_api_key", message="Incorrect API key"))
    assert text.startswith("run stopped: the API key was refused")
    assert "OPENAI_API_KEY" in text and "HTTP 401" in text and "Incorrect API key" in text
    assert "resume" in fatal_message(api_error(429, "insufficient_quota"))


def test_a_bad_key_against_the_simulator_is_fatal_for_the_run(make_sim):
    server = make_sim(api_key="sk-the-right-key")

    async def call() -> None:
        client = openai.AsyncOpenAI(api_key="sk-wrong-key", base_url=server.url, max_retries=0)
        async with client:
            await client.chat.completions.create(
                model="sim-chat", messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.AuthenticationError) as info:
        asyncio.run(call())
    d = classify(info.value)
    assert (d.kind, d.cause, d.retry, d.bisect) == ("fatal_run", "auth", False, False)
