"""Real tiktoken counts for the simulated endpoint's ``usage`` (offline, via
``dfbatch.plan._tokens``).

>>> from dfbatch.sim.tokenizer import encoder_for, chat_prompt_tokens
>>> enc = encoder_for("sim-chat")
>>> len(enc.encode("hello world"))
2
>>> chat_prompt_tokens(enc, [{"role": "user", "content": "hello world"}])
9
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

_DEFAULT = "cl100k_base"


@functools.lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    import tiktoken

    from dfbatch.plan._tokens import seed_tiktoken_cache

    seed_tiktoken_cache()
    return tiktoken.get_encoding(name)


def encoder_for(model: str) -> Any:
    """The tiktoken encoding of ``model`` (``o200k_base`` for gpt-4o-like names), else cl100k."""
    import tiktoken

    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        name = _DEFAULT
    if name not in ("cl100k_base", "o200k_base"):  # only these two ship offline
        name = _DEFAULT
    return _encoding(name)


def chat_prompt_tokens(enc: Any, messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request the way OpenAI counts them (cookbook formula)."""
    total = 3
    for message in messages:
        role = str(message.get("role", ""))
        total += (
            3 + len(enc.encode_ordinary(role)) + len(enc.encode_ordinary(message_text(message)))
        )
        if message.get("name"):
            total += 1
    return total


def message_text(message: dict[str, Any]) -> str:
    """The text of a message whose content is a string or a list of ``{"type": "text"}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def truncate(enc: Any, text: str, max_tokens: int) -> tuple[str, int, bool]:
    """``text`` cut to ``max_tokens`` tokens: (text, tokens, truncated)."""
    ids = enc.encode_ordinary(text)
    if len(ids) <= max_tokens:
        return text, len(ids), False
    return enc.decode(ids[:max_tokens]), max_tokens, True
