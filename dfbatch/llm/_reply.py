"""Reading a chat completion: a reply that is not one (``parsed``), a row's value or
``RowError`` from it (``answer``, ``fit`` for batch mode), typed output columns, the usage, and
an API error's status and message. Used by ``dfbatch.llm.chat`` (synchronous calls, batch mode
and the Batch API adapter alike).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from dfbatch.errors import MalformedReplyError, RowError
from dfbatch.llm.schema import ResponseFormat


def parsed(raw: Any) -> Any:
    """The completion in a raw response, or ``MalformedReplyError`` (transient) when the reply
    is not one (not JSON, an HTML page, no ``choices``, an error body sent with status 200)."""
    try:
        completion = raw.parse()
        choices = completion.choices
        if isinstance(choices, list) and choices and choices[0].message is not None:
            return completion
        problem = "no choices"
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        problem = type(exc).__name__
    try:
        text = " ".join(str(raw.text).split())
    except Exception:  # only for the message
        text = ""
    excerpt = text if len(text) <= 120 else text[:117] + "..."
    msg = (f"the provider's reply was malformed (HTTP {getattr(raw, 'status_code', '?')}, "
           f"{problem}): {excerpt!r}")
    raise MalformedReplyError(msg)


def answer(fmt: ResponseFormat, completion: Any) -> Any:
    """A row's value from its completion, or a ``RowError``: a refusal, a blocked or empty
    answer. An answer cut at ``max_tokens`` (``finish_reason="length"``) is kept as text (it
    was paid for; raise ``max_tokens`` to avoid it); a cut structured answer that does not
    parse is a row error."""
    choice = completion.choices[0]
    refusal = getattr(choice.message, "refusal", None)
    if refusal:
        return RowError(f"the model refused: {refusal}")
    content = choice.message.content
    reason = choice.finish_reason
    if reason == "content_filter":
        return RowError("the provider's content filter blocked the answer "
                        "(finish_reason=content_filter)")
    if content is None:
        return RowError(f"empty answer, finish_reason={reason}")
    if not fmt.structured:
        return content
    value, problem = fmt.parse(content)
    if problem is not None:
        cut = " (cut at max_tokens)" if choice.finish_reason == "length" else ""
        return RowError(f"structured answer does not fit the schema: {problem}{cut}")
    return value


def used(completion: Any) -> tuple[int, int]:
    usage = getattr(completion, "usage", None)
    return (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)


def fit(fmt: ResponseFormat, value: Any) -> Any:
    """One batch-mode answer as a row value: text, or a struct checked against the schema."""
    if not fmt.structured:
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    fitted, problem = fmt.coerce(value)
    return RowError(f"structured answer does not fit the schema: {problem}") if problem else fitted


def column(fmt: ResponseFormat, values: list[Any]) -> list[Any] | pl.Series:
    """A typed Series when every row succeeded, else the list with ``RowError`` items."""
    if any(isinstance(v, RowError) for v in values):
        return values
    dtype = fmt.dtype if fmt.structured else pl.String()
    return pl.Series("output", values, dtype=dtype, strict=False)


def status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def message(exc: BaseException) -> str:
    """The server's own error message (``body.message``) when there is one, else ``str(exc)``."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    text = body.get("message") if isinstance(body, dict) else None
    text = str(text or getattr(exc, "message", None) or exc).strip()
    status = status_of(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"HTTP {status}: {first}" if status is not None else first
