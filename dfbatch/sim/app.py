"""The aiohttp application of the simulated OpenAI-compatible endpoint (routes and handlers).

Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``, the Batch
API's ``/v1/files`` and ``/v1/batches`` (``dfbatch.sim.batches``) and, specific
to the simulator, ``GET /v1/sim/stats`` (a JSON snapshot of ``SimStats``). Errors have OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``. A request goes through: outage
(connection reset or 503 while ``SimConfig.outage`` says the server is down), key check (401,
when ``api_key`` is set; the message echoes the presented key, as a worst case for client-side
redaction), parse and validate (400), model check (404 unknown with ``strict_models``, 403
forbidden), poison marker (400), overload (a 429 that is not a rate limit), rate limiter (429,
headers in the configured style), injected fault (500 / hang / reset), then the deterministic
answer after the simulated latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import socket
import struct
import time
from typing import Any

from aiohttp import web

from dfbatch.sim.batches import BatchStore
from dfbatch.sim.config import SimConfig
from dfbatch.sim.content import answer_text, batch_items, fill_schema, keywords, summary
from dfbatch.sim.embedding import embed_texts, encode_vector
from dfbatch.sim.latency import Dice
from dfbatch.sim.ratelimit import Decision, RateLimiter, rejection_headers
from dfbatch.sim.stats import SimStats
from dfbatch.sim.tokenizer import chat_prompt_tokens, encoder_for, message_text, truncate

_MAX_DIMENSIONS = 8192


class _Reject(Exception):
    """Internal: answer the current request with an error response."""

    def __init__(self, response: web.Response, kind: str | None = None) -> None:
        super().__init__(response.status)
        self.response = response
        self.kind = kind


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class SimApp:
    """Handlers sharing one config, one rate limiter, one RNG and one stats recorder."""

    def __init__(self, config: SimConfig, stats: SimStats) -> None:
        self.config = config
        self.stats = stats
        self.dice = Dice(config)
        self.limiter = RateLimiter(
            config.rpm,
            config.tpm,
            config.window_s,
            hold_s=config.limit_window_real_s,
            mode=config.limit_mode,
            offset_s=config.calendar_offset_s * config.time_scale,
            style=config.headers,
        )
        self._overload_rng = random.Random(config.seed + 1)  # own draws: others unchanged
        self._closing: asyncio.Event | None = None
        self._ids = 0
        self.batches = BatchStore(config, stats.sim_now, chat_answer, self._check_key)

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._guard("chat", self.chat))
        app.router.add_post("/v1/embeddings", self._guard("embeddings", self.embeddings))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/sim/stats", self.stats_view)
        self.batches.routes(app.router, self._guard)  # /v1/files, /v1/batches
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        self._closing = asyncio.Event()

    async def _shutdown(self, app: web.Application) -> None:
        if self._closing is not None:
            self._closing.set()  # wakes every sleeping / hanging handler

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server shuts down."""
        if seconds <= 0 or self._closing is None:
            return
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def _guard(self, endpoint: str, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.stats.enter()
            t = self.stats.now()
            try:
                if self.config.is_down(t / self.config.time_scale):
                    return self._down(request, endpoint, t)
                return await handler(request, t)
            except _Reject as rej:
                retry_after = _hint_s(rej.response.headers)
                status = rej.response.status
                self.stats.record(endpoint, status, retry_after_s=retry_after, t=t, kind=rej.kind)
                return rej.response
            finally:
                self.stats.leave()

        return wrapped

    def _down(self, request: web.Request, endpoint: str, t: float) -> web.Response:
        """Answer a request that arrived during the outage: reset it, or a 503."""
        if self.config.outage_kind == "reset":
            self.stats.record(endpoint, 0, t=t, kind="outage", down=True)
            _reset(request)
            return web.Response(status=503)  # never reaches the client: connection is gone
        self.stats.record(endpoint, 503, t=t, kind="outage", down=True)
        msg = "The server is temporarily unavailable (simulated outage)."
        return error_response(503, msg, type_="server_error", code="service_unavailable")

    # -- shared steps ---------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        self._check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise _Reject(error_response(400, "request body is not valid JSON")) from None
        if not isinstance(body, dict):
            raise _Reject(error_response(400, "request body must be a JSON object"))
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _Reject(error_response(400, "you must provide a model parameter", param="model"))
        self._check_model(body["model"])
        return body

    def _check_model(self, model: str) -> None:
        if model in self.config.forbidden_models:
            msg = f"You are not allowed to sample from model `{model}`. (dfbatch simulator)"
            raise _Reject(error_response(403, msg, code="model_not_allowed"), "permission")
        if self.config.strict_models and model not in self.config.models:
            msg = (
                f"The model `{model}` does not exist or you do not have access to it. "
                "(dfbatch simulator)"
            )
            raise _Reject(error_response(404, msg, code="model_not_found"), "model_not_found")

    def _check_key(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if presented != key:
            msg = f"Incorrect API key provided: {presented}. (dfbatch simulator)"
            raise _Reject(error_response(401, msg, code="invalid_api_key"), "auth")

    def _check_poison(self, texts: list[str], param: str) -> None:
        marker = self.config.poison_marker
        if marker and any(marker in t for t in texts):
            msg = f"Invalid content: the input contains the simulator's poison marker {marker!r}"
            raise _Reject(error_response(400, msg, code="poison", param=param))

    def _admit(self, model: str, tokens: int) -> dict[str, str]:
        c = self.config
        if c.overload_rate and self._overload_rng.random() < c.overload_rate:
            msg = "The engine is currently overloaded, please try again later. (simulated)"
            response = error_response(
                429,
                msg,
                type_="server_error",
                code="engine_overloaded",
                headers=self.limiter.headers(),
            )
            raise _Reject(response, "overload")
        decision = self.limiter.admit(tokens, now=self.stats.now())
        if not decision.ok:
            hints = rejection_headers(
                c.headers,
                decision.retry_after_s,
                window_s=c.limit_window_real_s,
                retry_after_ms=c.retry_after_ms,
            )
            raise _Reject(_rate_limited(model, tokens, decision, hints, c.headers), "rate_limit")
        return decision.headers

    async def _fault(self, request: web.Request, endpoint: str, t: float) -> None:
        fault = self.dice.fault()
        if fault == "error":
            await self._sleep(self.config.ttft_s * self.config.time_scale)
            msg = "The server had an error while processing your request. (simulated)"
            raise _Reject(error_response(500, msg, type_="server_error"))
        if fault == "hang":
            self.stats.fault("hang")
            await self._sleep(self.config.hang_s * self.config.time_scale)
            msg = "simulated hang ended without an answer"
            raise _Reject(error_response(504, msg, type_="server_error"))
        if fault == "reset":
            self.stats.fault("reset")
            self.stats.record(endpoint, 0, t=t)
            _reset(request)
            raise _Reset

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-sim-{self._ids}"

    # -- handlers -------------------------------------------------------------------------
    async def chat(self, request: web.Request, t: float) -> web.StreamResponse:
        try:
            return await self._chat(request, t)
        except _Reset:
            return web.Response(status=500)  # never reaches the client: connection is gone

    async def _chat(self, request: web.Request, t: float) -> web.Response:
        body = await self._body(request)
        model, messages = body["model"], body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reject(
                error_response(400, "messages must be a non-empty list", param="messages")
            )
        if body.get("stream"):
            msg = "stream=true is not supported by the dfbatch simulator"
            raise _Reject(error_response(400, msg, param="stream"))
        self._check_poison([message_text(m) for m in messages if isinstance(m, dict)], "messages")
        enc = encoder_for(model)
        prompt_tokens = chat_prompt_tokens(enc, [m for m in messages if isinstance(m, dict)])
        max_tokens = _max_tokens(body, self.config.default_max_tokens)
        headers = self._admit(model, prompt_tokens + max_tokens)
        await self._fault(request, "chat", t)
        content = chat_answer(messages, body.get("response_format"), self.config.drop_marker)
        content, completion_tokens, cut = truncate(enc, content, max_tokens)
        await self._sleep(self.dice.chat_latency(prompt_tokens, completion_tokens))
        self.stats.record(
            "chat",
            200,
            charged_tokens=prompt_tokens + max_tokens,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            t=t,
        )
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "finish_reason": "length" if cut else "stop",
            "logprobs": None,
        }
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        payload = {
            "id": self._next_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": "dfbatch-sim",
        }
        return web.json_response(payload, headers=headers)

    async def embeddings(self, request: web.Request, t: float) -> web.StreamResponse:
        try:
            return await self._embeddings(request, t)
        except _Reset:
            return web.Response(status=500)

    async def _embeddings(self, request: web.Request, t: float) -> web.Response:
        body = await self._body(request)
        model = body["model"]
        enc = encoder_for(model)
        texts = _embedding_inputs(body.get("input"), enc)
        dims = body.get("dimensions")
        dims = self.config.embedding_dimensions if dims is None else dims
        if isinstance(dims, bool) or not isinstance(dims, int) or not 0 < dims <= _MAX_DIMENSIONS:
            msg = f"dimensions must be an integer in 1..{_MAX_DIMENSIONS}, got {dims!r}"
            raise _Reject(error_response(400, msg, param="dimensions"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            msg = f"encoding_format must be 'float' or 'base64', got {fmt!r}"
            raise _Reject(error_response(400, msg, param="encoding_format"))
        self._check_poison(texts, "input")
        tokens = sum(len(enc.encode_ordinary(x)) for x in texts)
        headers = self._admit(model, tokens)
        await self._fault(request, "embeddings", t)
        vectors = embed_texts(texts, dims)
        await self._sleep(self.dice.embed_latency(tokens))
        self.stats.record("embeddings", 200, charged_tokens=tokens, prompt_tokens=tokens, t=t)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
            for i, v in enumerate(vectors)
        ]
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.json_response(payload, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "dfbatch-sim"}
            for m in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def stats_view(self, request: web.Request) -> web.Response:
        snap = dataclasses.asdict(self.stats.snapshot())
        snap["by_status"] = {str(k): v for k, v in snap["by_status"].items()}
        return web.json_response(snap)


class _Reset(Exception):
    """Internal: the connection was reset on purpose."""


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"{key} must be an integer > 0, got {value!r}"
                raise _Reject(error_response(400, msg, param=key))
            return value
    return default


def _hint_s(headers: Any) -> float | None:
    """The wait a 429 told the client (seconds), whatever the spelling; None without one."""
    for name, scale in (
        ("retry-after-ms", 1000.0),
        ("retry-after", 1.0),
        ("llm_provider-retry-after", 1.0),
    ):
        value = headers.get(name)
        if value:
            return float(value) / scale
    return None


def _rate_limited(
    model: str, tokens: int, decision: Decision, hints: dict[str, str], style: str
) -> web.Response:
    kind = decision.limited_by
    unit = "RPM" if kind == "requests" else "TPM"
    limit = decision.headers.get(f"x-ratelimit-limit-{kind}", "?")
    requested = 1 if kind == "requests" else tokens
    if style == "litellm":  # the proxy's shape: code is a string, type and param "None"
        msg = (
            f"Rate limit exceeded for api_key: sim. Limit type: {kind}. "
            f"Current limit: {limit}, Remaining: 0. (simulated LiteLLM)"
        )
        body = {"error": {"message": msg, "type": "None", "param": "None", "code": "429"}}
        return web.json_response(body, status=429, headers={**decision.headers, **hints})
    if style == "none":
        msg = f"Rate limit reached for {model} on {kind} per min ({unit}). (simulated)"
        return error_response(429, msg, type_=kind, code="rate_limit_exceeded")
    if math.isinf(decision.retry_after_s):
        msg = (
            f"Request too large for {model} on {kind} per min ({unit}): Limit {limit}, "
            f"Requested {requested}. (simulated)"
        )
        return error_response(
            429, msg, type_=kind, code="rate_limit_exceeded", headers=decision.headers
        )
    wait = decision.retry_after_s
    msg = (
        f"Rate limit reached for {model} on {kind} per min ({unit}): Limit {limit}, "
        f"Requested {requested}. Please try again in {wait:.3f}s. (simulated)"
    )
    headers = {**decision.headers, **hints}
    return error_response(429, msg, type_=kind, code="rate_limit_exceeded", headers=headers)


def _embedding_inputs(raw: Any, enc: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(x, str) for x in raw):
            return list(raw)
        if all(isinstance(x, int) for x in raw):
            return [enc.decode(raw)]
        if all(isinstance(x, list) and all(isinstance(i, int) for i in x) for x in raw):
            return [enc.decode(x) for x in raw]
    msg = "input must be a string, a list of strings, or token ids (list of ints / lists)"
    raise _Reject(error_response(400, msg, param="input"))


def chat_answer(messages: list[Any], response_format: Any, drop_marker: str) -> str:
    """The deterministic answer to the last user message, shaped by ``response_format``."""
    user = next(
        (
            message_text(m)
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    items = batch_items(user)
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return json.dumps(fill_schema(schema, user, items=items, drop_marker=drop_marker))
    if items is not None:  # batch mode without a schema: the conventional {"results": [...]}
        results = [
            {"id": it["id"], "output": answer_text(str(it.get("input", "")))}
            for it in items
            if drop_marker not in str(it.get("input", ""))
        ]
        return json.dumps({"results": results})
    if kind == "json_object":
        return json.dumps({"summary": summary(user), "keywords": keywords(user)})
    return answer_text(user)
