"""The error replies of the simulated endpoint, in OpenAI's shape (or the gateway's).

``error_response`` builds ``{"error": {"message", "type", "param", "code"}}``; a handler raises
``Reject(response, kind)`` to answer with it (``kind``: what the stats log records);
``rate_limited`` shapes a 429 in the configured header style; ``reset`` aborts the connection
(a dead server, as the client sees it) and ``Reset`` unwinds the handler after it.

Examples
--------
>>> import json
>>> r = error_response(400, "messages must be a non-empty list", param="messages")
>>> r.status, json.loads(r.text)["error"]["param"]
(400, 'messages')
>>> hint_s({"retry-after-ms": "250"}), hint_s({"llm_provider-retry-after": "60"}), hint_s({})
(0.25, 60.0, None)
"""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

from aiohttp import web

from dfbatch.sim.ratelimit import Decision


class Reject(Exception):
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


class Reset(Exception):
    """Internal: the connection was reset on purpose."""


def reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def hint_s(headers: Any) -> float | None:
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


def rate_limited(
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
    if style == "ietf":  # a generic gateway: no wait in the body, only the headers
        return error_response(429, "Too Many Requests (simulated gateway)", type_=kind,
                              code="rate_limit_exceeded", headers={**decision.headers, **hints})
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
