"""The aiohttp application of the simulated OpenAI-compatible endpoint (routes and handlers).

Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``, the Batch
API's ``/v1/files`` and ``/v1/batches`` (``dfbatch.sim.batches``) and, specific
to the simulator, ``GET /v1/sim/stats`` (a JSON snapshot of ``SimStats``). Errors have OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``. A request goes through: outage
(connection reset or 503 while ``SimConfig.outage`` says the server is down), parse and
validate (400), the checks of ``dfbatch.sim.checks`` (key, model, poison, overload, rate limiter,
injected fault), then the deterministic answer (``content.chat_answer``) after the simulated
latency. Error replies are built by ``dfbatch.sim.replies``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from aiohttp import web

from dfbatch.sim.batches import BatchStore
from dfbatch.sim.checks import Checks
from dfbatch.sim.config import SimConfig
from dfbatch.sim.content import chat_answer
from dfbatch.sim.embedding import embed_texts, encode_vector
from dfbatch.sim.latency import Dice
from dfbatch.sim.replies import Reject, Reset, error_response, hint_s, reset
from dfbatch.sim.stats import SimStats
from dfbatch.sim.tokenizer import chat_prompt_tokens, encoder_for, message_text, truncate

_MAX_DIMENSIONS = 8192


class SimApp:
    """Handlers sharing one config, the request checks (``Checks``: its rate limiter, RNG) and
    one stats recorder."""

    def __init__(self, config: SimConfig, stats: SimStats) -> None:
        self.config = config
        self.stats = stats
        self.dice = Dice(config)
        self.checks = Checks(config, stats, self.dice, self._sleep)
        self._closing: asyncio.Event | None = None
        self._ids = 0
        self.batches = BatchStore(config, stats.sim_now, chat_answer, self.checks.key)

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
        except TimeoutError:
            pass

    def _guard(self, endpoint: str, handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self.stats.enter()
            t = self.stats.now()
            try:
                if self.config.is_down(t / self.config.time_scale):
                    return self._down(request, endpoint, t)
                return await handler(request, t)
            except Reject as rej:
                retry_after = hint_s(rej.response.headers)
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
            reset(request)
            return web.Response(status=503)  # never reaches the client: connection is gone
        self.stats.record(endpoint, 503, t=t, kind="outage", down=True)
        msg = "The server is temporarily unavailable (simulated outage)."
        return error_response(503, msg, type_="server_error", code="service_unavailable")

    # -- shared steps ---------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        self.checks.key(request)
        try:
            body = await request.json()
        except ValueError:
            raise Reject(error_response(400, "request body is not valid JSON")) from None
        if not isinstance(body, dict):
            raise Reject(error_response(400, "request body must be a JSON object"))
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise Reject(error_response(400, "you must provide a model parameter", param="model"))
        self.checks.model(body["model"])
        return body

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-sim-{self._ids}"

    # -- handlers -------------------------------------------------------------------------
    async def chat(self, request: web.Request, t: float) -> web.StreamResponse:
        try:
            return await self._chat(request, t)
        except Reset:
            return web.Response(status=500)  # never reaches the client: connection is gone

    async def _chat(self, request: web.Request, t: float) -> web.Response:
        body = await self._body(request)
        model, messages = body["model"], body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Reject(
                error_response(400, "messages must be a non-empty list", param="messages")
            )
        if body.get("stream"):
            msg = "stream=true is not supported by the dfbatch simulator"
            raise Reject(error_response(400, msg, param="stream"))
        self.checks.poison([message_text(m) for m in messages if isinstance(m, dict)], "messages")
        enc = encoder_for(model)
        prompt_tokens = chat_prompt_tokens(enc, [m for m in messages if isinstance(m, dict)])
        max_tokens = _max_tokens(body, self.config.default_max_tokens)
        headers = self.checks.admit(model, prompt_tokens + max_tokens)
        await self.checks.fault(request, "chat", t)
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
        except Reset:
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
            raise Reject(error_response(400, msg, param="dimensions"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            msg = f"encoding_format must be 'float' or 'base64', got {fmt!r}"
            raise Reject(error_response(400, msg, param="encoding_format"))
        self.checks.poison(texts, "input")
        tokens = sum(len(enc.encode_ordinary(x)) for x in texts)
        headers = self.checks.admit(model, tokens)
        await self.checks.fault(request, "embeddings", t)
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


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"{key} must be an integer > 0, got {value!r}"
                raise Reject(error_response(400, msg, param=key))
            return value
    return default


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
    raise Reject(error_response(400, msg, param="input"))
