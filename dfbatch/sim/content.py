"""Deterministic answers of the simulated model: the same input always gets the same answer.

A prompt is split into an instruction and a body (``"Summarize: <body>"``). The answer is a
short extractive summary of the body (its first sentence, at most 24 words), or a keyword list
when the instruction asks for keywords. With a ``json_schema`` response format the answer is
JSON matching the schema's properties (strings from the body, enums picked by hash, numbers in
bounds). A batch-mode prompt (a JSON list of ``{"id": ..., "input": ...}`` items) gets one
result per item, each derived from that item's own input, so a client can map it back.

Examples
--------
>>> from dfbatch.sim.content import answer_text, fill_schema, keywords
>>> answer_text("Summarize: Polars is fast. It is written in Rust.")
'Polars is fast.'
>>> keywords("the cat sat on the mat with another cat", k=3)
['cat', 'sat', 'mat']
>>> schema = {"type": "object", "properties": {
...     "title": {"type": "string"}, "n_words": {"type": "integer"},
...     "mood": {"enum": ["happy", "sad"]}}}
>>> fill_schema(schema, "A quiet day by the river.")
{'title': 'A quiet day by the river.', 'n_words': 6, 'mood': 'sad'}
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from dfbatch.sim.tokenizer import message_text

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_STOP = frozenset(
    "the and for are but not you all any can had her was one our out has him his how its may "
    "new now old see two way who did get let put say she too use that with have this will your "
    "from they been more when were what which their there than them then these some into only "
    "other also such each most over very just should would could about after before where while "
    "return returns none true false self object value values default given if none".split()
)
_SUMMARY_WORDS = 24


def split_prompt(text: str) -> tuple[str, str]:
    """``(instruction, body)``: a short first line ending in ':' or a short ``"...: "`` prefix."""
    head, sep, rest = text.partition("\n")
    if sep and len(head) <= 200 and head.rstrip().endswith(":"):
        return head, rest
    prefix, sep, rest = text.partition(": ")
    if sep and len(prefix) <= 80 and "\n" not in prefix:
        return prefix, rest
    return "", text


def summary(body: str, max_words: int = _SUMMARY_WORDS) -> str:
    """The first sentence of ``body``, at most ``max_words`` words."""
    body = body.strip()
    if not body:
        return "(empty input)"
    first = _SENTENCE_END.split(body, maxsplit=1)[0]
    words = first.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def keywords(body: str, k: int = 5) -> list[str]:
    """The ``k`` most frequent non-stopwords of ``body`` (ties: first occurrence first)."""
    words = [w.lower() for w in _WORD.findall(body)]
    counts = Counter(w for w in words if w not in _STOP)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:k]]


def answer_text(prompt: str) -> str:
    """The plain-text answer to a prompt: a keyword list or an extractive summary."""
    instruction, body = split_prompt(prompt)
    if "keyword" in instruction.lower():
        return ", ".join(keywords(body)) or "(no keywords)"
    return summary(body)


def digest(*parts: str) -> int:
    """A stable 64-bit hash of the parts (same value on every run and platform)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def batch_items(text: str) -> list[dict[str, Any]] | None:
    """The items of a batch-mode prompt (a JSON list of objects with ``id``), else None."""
    start = text.find("[")
    if start < 0:
        return None
    try:
        items = json.loads(text[start:])
    except ValueError:
        return None
    if isinstance(items, list) and items and all(isinstance(i, dict) and "id" in i for i in items):
        return items
    return None


def fill_schema(
    schema: dict[str, Any],
    text: str,
    *,
    name: str = "",
    items: list[dict[str, Any]] | None = None,
    drop_marker: str | None = None,
    root: dict[str, Any] | None = None,
) -> Any:
    """A JSON value matching ``schema``, derived from ``text`` (see module docstring)."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        options = schema["enum"]
        return options[digest(name, text) % len(options)] if options else None
    kind = _type_of(schema)
    if kind == "object":
        props = schema.get("properties") or {"summary": {"type": "string"}}
        return {
            key: fill_schema(sub, text, name=key, items=items, drop_marker=drop_marker, root=root)
            for key, sub in props.items()
        }
    if kind == "array":
        return _fill_array(schema, text, name, items, drop_marker, root)
    return _fill_scalar(kind, schema, text, name)


def _fill_array(
    schema: dict[str, Any],
    text: str,
    name: str,
    items: list[dict[str, Any]] | None,
    drop_marker: str | None,
    root: dict[str, Any],
) -> list[Any]:
    item_schema = _resolve(schema.get("items") or {"type": "string"}, root)
    props = item_schema.get("properties") or {}
    if items is not None and _type_of(item_schema) == "object" and "id" in props:
        out = []
        for item in items:
            body = str(item.get("input", ""))
            if drop_marker and drop_marker in body:
                continue
            value = fill_schema(item_schema, body, name=name, root=root)
            out.append({**value, "id": item["id"]})
        return out
    if _type_of(item_schema) == "string" and "enum" not in item_schema:
        k = min(int(schema.get("maxItems", 5)), 5)
        words = keywords(split_prompt(text)[1], k=k)
        return words or [summary(text, 3)]
    n = max(int(schema.get("minItems", 1)), 1 + digest(name, text) % 3)
    return [fill_schema(item_schema, text, name=f"{name}{i}", root=root) for i in range(n)]


def _fill_scalar(kind: str, schema: dict[str, Any], text: str, name: str) -> Any:
    h = digest(name, text)
    lname = name.lower()
    _, body = split_prompt(text)
    if kind == "string":
        if any(w in lname for w in ("keyword", "tag", "topic")):
            return ", ".join(keywords(body)) or "(no keywords)"
        if any(w in lname for w in ("summary", "abstract", "description")):
            return summary(body)
        if "title" in lname or lname == "name":
            return summary(body, 6)
        if "lang" in lname:
            return "en"
        if "sentiment" in lname:
            return ("positive", "neutral", "negative")[h % 3]
        return answer_text(text)
    if kind == "integer":
        lo, hi = int(schema.get("minimum", 0)), int(schema.get("maximum", 10**6))
        value = len(body.split()) if any(w in lname for w in ("word", "count", "len")) else h % 100
        return min(max(value, lo), hi)
    if kind == "number":
        low, high = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0))
        return round(low + (high - low) * (h % 10_000) / 10_000, 4)
    if kind == "boolean":
        return bool(h & 1)
    return None


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        for key in ("anyOf", "oneOf", "allOf"):
            options = [o for o in schema.get(key, []) if o.get("type") != "null"]
            if options:
                return _type_of(options[0])
        return "object" if "properties" in schema else "string"
    return str(kind)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` (``#/$defs/X``) and pick the first non-null ``anyOf`` branch."""
    for _ in range(32):
        if "$ref" in schema:
            node: Any = root
            for part in str(schema["$ref"]).lstrip("#/").split("/"):
                node = node.get(part, {}) if part else node
            schema = node
            continue
        options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
        if options and "type" not in schema:
            schema = options[0]
            continue
        return schema
    return schema


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
