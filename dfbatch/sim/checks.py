"""The checks a request of the simulated endpoint goes through before it is answered.

``SimApp`` calls them in this order: the key (401, when ``api_key`` is set; the message echoes
the presented key, as a worst case for client-side redaction), the model (404 unknown with
``strict_models``, 403 forbidden), the poison marker (400), overload (a 429 that is not a rate
limit), the rate limiter (429, headers in the configured style), an injected fault (500 / hang
/ reset). A failed check raises ``Reject`` with the reply.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from aiohttp import web

from dfbatch.sim.config import SimConfig
from dfbatch.sim.latency import Dice
from dfbatch.sim.ratelimit import RateLimiter, rejection_headers
from dfbatch.sim.replies import Reject, Reset, error_response, rate_limited, reset
from dfbatch.sim.stats import SimStats


class Checks:
    """The request checks, sharing one config, rate limiter, dice and stats recorder."""

    def __init__(self, config: SimConfig, stats: SimStats, dice: Dice,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.config = config
        self.stats = stats
        self.dice = dice
        self._sleep = sleep
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

    def model(self, model: str) -> None:
        if model in self.config.forbidden_models:
            msg = f"You are not allowed to sample from model `{model}`. (dfbatch simulator)"
            raise Reject(error_response(403, msg, code="model_not_allowed"), "permission")
        if self.config.strict_models and model not in self.config.models:
            msg = (
                f"The model `{model}` does not exist or you do not have access to it. "
                "(dfbatch simulator)"
            )
            raise Reject(error_response(404, msg, code="model_not_found"), "model_not_found")

    def key(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if presented != key:
            msg = f"Incorrect API key provided: {presented}. (dfbatch simulator)"
            raise Reject(error_response(401, msg, code="invalid_api_key"), "auth")

    def poison(self, texts: list[str], param: str) -> None:
        marker = self.config.poison_marker
        if marker and any(marker in t for t in texts):
            msg = f"Invalid content: the input contains the simulator's poison marker {marker!r}"
            raise Reject(error_response(400, msg, code="poison", param=param))

    def admit(self, model: str, tokens: int) -> dict[str, str]:
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
            raise Reject(response, "overload")
        decision = self.limiter.admit(tokens, now=self.stats.now())
        if not decision.ok:
            hints = rejection_headers(
                c.headers,
                decision.retry_after_s,
                window_s=c.limit_window_real_s,
                retry_after_ms=c.retry_after_ms,
            )
            raise Reject(rate_limited(model, tokens, decision, hints, c.headers), "rate_limit")
        return decision.headers

    async def fault(self, request: web.Request, endpoint: str, t: float) -> None:
        fault = self.dice.fault()
        if fault == "error":
            await self._sleep(self.config.ttft_s * self.config.time_scale)
            msg = "The server had an error while processing your request. (simulated)"
            raise Reject(error_response(500, msg, type_="server_error"))
        if fault == "hang":
            self.stats.fault("hang")
            await self._sleep(self.config.hang_s * self.config.time_scale)
            msg = "simulated hang ended without an answer"
            raise Reject(error_response(504, msg, type_="server_error"))
        if fault == "reset":
            self.stats.fault("reset")
            self.stats.record(endpoint, 0, t=t)
            reset(request)
            raise Reset
