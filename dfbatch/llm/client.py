"""The ``AsyncOpenAI`` client of an adapter: imported lazily, one per event loop, keys hidden.

dfbatch retries by itself, so clients are built (or copied) with ``max_retries=0``. The key
comes from ``api_key=``, the client, or ``OPENAI_API_KEY``; the endpoint from ``base_url=``,
the client, or ``OPENAI_BASE_URL``. A local server (the simulator, vLLM, Ollama, llama.cpp)
needs no key: with a ``base_url`` and no key, a placeholder is sent.

An ``httpx`` connection pool belongs to the event loop that opened it, and ``dfbatch.process``
runs each call on a fresh loop, so a client is made per loop and closed when that loop shuts
down its async generators (``asyncio.run`` and ``dfbatch.process`` both do).

Keys never show: ``scrub`` removes them from an exception's message, arguments, body and
request headers (in place, so the exception keeps its type, status and retry headers).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

from dfbatch.errors import ConfigError

REDACTED = "[redacted]"
_EXTRA = "pip install 'dfbatch[llm]'"
_LOCAL_KEY = "sk-local-no-key-needed"
_MIN_SECRET = 6  # shorter strings are too likely to occur by chance to be worth replacing


def import_openai() -> Any:
    """``import openai``, or an ImportError that names the extra to install."""
    try:
        import openai
    except ImportError as e:
        msg = f"dfbatch.llm needs the OpenAI SDK: {_EXTRA}"
        raise ImportError(msg) from e
    return openai


class ClientSource:
    """Hands out the ``AsyncOpenAI`` client for the running event loop."""

    def __init__(
        self,
        client: Any = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
    ) -> None:
        openai = import_openai()
        self._openai = openai
        self._fixed: Any = None
        self._kwargs: dict[str, Any] = {}
        if client is not None:
            if base_url is not None or api_key is not None:
                msg = "pass either client=... or base_url= / api_key=, not both"
                raise ConfigError(msg)
            options: dict[str, Any] = {"max_retries": 0}
            if timeout is not None:
                options["timeout"] = timeout
            self._fixed = client.with_options(**options)
            key: str | None = getattr(client, "api_key", None)
            url: str | None = str(getattr(client, "base_url", ""))
        else:
            url = base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = api_key or os.environ.get("OPENAI_API_KEY") or None
            if key is None and url is None:
                msg = (
                    "no API key: set OPENAI_API_KEY, pass api_key=... or client=...; for a local "
                    "OpenAI-compatible server (e.g. dfbatch.sim) pass base_url=... instead"
                )
                raise ConfigError(msg)
            self._kwargs = {"api_key": key or _LOCAL_KEY, "base_url": url, "max_retries": 0}
            if timeout is not None:
                self._kwargs["timeout"] = timeout
        self.secrets = _secrets(key, url)
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return "ClientSource(<credentials hidden>)"

    async def get(self) -> Any:
        """The client for the running loop (created on first use, closed with the loop)."""
        if self._fixed is not None:
            return self._fixed
        loop = asyncio.get_running_loop()
        entry = self._per_loop.get(loop)
        if entry is None:
            holder = _hold(self._openai.AsyncOpenAI(**self._kwargs))
            client = await holder.__anext__()
            entry = self._per_loop[loop] = (client, holder)  # keep the generator alive
        return entry[0]


async def _hold(client: Any) -> AsyncIterator[Any]:
    """Yield ``client`` and close it when the loop finalizes this generator at shutdown."""
    try:
        yield client
    finally:
        await client.close()


def _secrets(key: Any, url: str | None) -> tuple[str, ...]:
    found = [key] if isinstance(key, str) else []
    if url:
        parts = urlsplit(url)
        found += [parts.password or "", parts.query]
    return tuple(s for s in dict.fromkeys(found) if len(s) >= _MIN_SECRET and s != _LOCAL_KEY)


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``[redacted]``.

    >>> scrub_text("bad key sk-123456 given", ["sk-123456"])
    'bad key [redacted] given'
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {k: _scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub_value(v, secrets) for v in value)
    return value


def scrub(exc: BaseException, secrets: tuple[str, ...]) -> BaseException:
    """Remove ``secrets`` from ``exc`` and its cause chain, in place; returns ``exc``.

    >>> e = ValueError("Incorrect API key provided: sk-abcdef")
    >>> str(scrub(e, ("sk-abcdef",)))
    'Incorrect API key provided: [redacted]'
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if secrets:
            current.args = _scrub_value(current.args, secrets)
            for attr in ("message", "body"):
                if isinstance(getattr(current, attr, None), (str, dict, list)):
                    setattr(current, attr, _scrub_value(getattr(current, attr), secrets))
        _redact_headers(current)
        current = current.__cause__ or current.__context__
    return exc


def _redact_headers(exc: BaseException) -> None:
    """Hide the Authorization header of the request an HTTP error carries."""
    for owner in (exc, getattr(exc, "response", None)):
        try:
            request = getattr(owner, "request", None)
        except RuntimeError:  # httpx raises when a response has no request attached
            continue
        headers = getattr(request, "headers", None)
        if headers is not None and "authorization" in headers:
            try:
                headers["authorization"] = f"Bearer {REDACTED}"
            except TypeError:  # immutable headers: nothing we can do, and nothing printed
                pass
