"""Structured output: a ``response_format`` (JSON schema dict or pydantic model) and its column.

``ResponseFormat.of(x)`` accepts ``None``, a pydantic model class, a JSON schema (``{"type":
"object", "properties": ...}``) or a full OpenAI ``response_format`` dict (``{"type":
"json_schema", ...}`` / ``{"type": "json_object"}``). ``dtype`` is the Polars struct the answers
become; ``coerce`` turns one parsed answer into a value of that dtype or explains the mismatch.

Examples
--------
>>> from dfbatch.llm.schema import ResponseFormat
>>> fmt = ResponseFormat.of({"type": "object", "properties": {
...     "title": {"type": "string"}, "stars": {"type": "integer"},
...     "tags": {"type": "array", "items": {"type": "string"}}}})
>>> fmt.dtype
Struct({'title': String, 'stars': Int64, 'tags': List(String)})
>>> fmt.coerce({"title": "Hi", "stars": "4", "extra": 1})
({'title': 'Hi', 'stars': 4, 'tags': None}, None)
>>> fmt.coerce({"title": "Hi", "stars": "many"})[1]
"field 'stars': expected integer, got 'many'"
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from dfbatch.errors import ConfigError

_SCALARS: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "boolean": pl.Boolean(),
}


class _Mismatch(ValueError):
    pass


@dataclass(frozen=True)
class ResponseFormat:
    """What to ask the API for (``api``) and how to read the answer (``schema``, ``model``)."""

    api: dict[str, Any] | None = None  # the response_format sent to the API
    schema: dict[str, Any] | None = None  # JSON schema of one answer (None: free text / object)
    model: Any = None  # a pydantic model class, used to validate answers

    @classmethod
    def of(cls, value: Any) -> ResponseFormat:
        if value is None:
            return cls()
        if isinstance(value, type) and hasattr(value, "model_json_schema"):
            schema = value.model_json_schema()
            return cls(_json_schema_format(value.__name__, schema), schema, value)
        if not isinstance(value, dict):
            msg = (
                "response_format must be None, a pydantic model class or a JSON schema dict, "
                f"got {type(value).__name__}"
            )
            raise ConfigError(msg)
        kind = value.get("type")
        if kind == "json_schema":
            inner = value.get("json_schema") or {}
            schema = inner.get("schema")
            if not isinstance(schema, dict):
                msg = "response_format {'type': 'json_schema'} needs json_schema={'name', 'schema'}"
                raise ConfigError(msg)
            return cls(copy.deepcopy(value), schema)
        if kind == "json_object":
            return cls({"type": "json_object"}, None)
        if kind == "text":
            return cls()
        if kind == "object" or "properties" in value:
            return cls(_json_schema_format(str(value.get("title", "answer")), value), value)
        msg = (
            "response_format dict must be a JSON schema ({'type': 'object', 'properties': ...}) "
            "or an OpenAI response_format ({'type': 'json_schema', ...}), "
            f"got keys {sorted(value)}"
        )
        raise ConfigError(msg)

    @property
    def structured(self) -> bool:
        return self.api is not None

    @property
    def dtype(self) -> pl.DataType | None:
        """The Polars dtype of the answers (None for free text or an unknown shape)."""
        if self.schema is None:
            return None
        try:
            return _dtype(self.schema, self.schema)
        except _Mismatch:
            return None

    def coerce(self, value: Any) -> tuple[Any, str | None]:
        """``(value fitting dtype, None)`` or ``(None, why it does not fit)``."""
        if self.model is not None:
            try:
                return self.model.model_validate(value).model_dump(mode="json"), None
            except Exception as e:  # pydantic.ValidationError
                first = str(e).strip().splitlines()
                return None, " ".join(first[:3])
        if self.schema is None:
            return value, None
        try:
            return _coerce(value, self.schema, self.schema, ""), None
        except _Mismatch as e:
            return None, str(e)

    def parse(self, content: str | None) -> tuple[Any, str | None]:
        """Parse one JSON answer (``content`` of a message) and coerce it."""
        if content is None:
            return None, "empty answer"
        try:
            value = json.loads(strip_fences(content))
        except ValueError as e:
            return None, f"answer is not valid JSON ({e})"
        return self.coerce(value)


def strip_fences(text: str) -> str:
    """Remove a Markdown code fence around a JSON answer, if any.

    >>> strip_fences('```json\\n{"a": 1}\\n```')
    '{"a": 1}'
    """
    s = text.strip()
    if s.startswith("```"):
        s = s.split("\n", 1)[1] if "\n" in s else ""
        s = s.rsplit("```", 1)[0]
    return s.strip()


def _json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    clean = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64] or "answer"
    return {
        "type": "json_schema",
        "json_schema": {"name": clean, "schema": schema, "strict": False},
    }


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    for _ in range(32):
        if "$ref" in schema:
            node: Any = root
            for part in str(schema["$ref"]).lstrip("#/").split("/"):
                node = node.get(part, {}) if part else node
            schema = node
            continue
        options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1 and "type" not in schema:
            schema = options[0]
            continue
        return schema
    return schema


def _kind(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return "string"
    if kind is None and "properties" in schema:
        return "object"
    return kind


def _dtype(schema: dict[str, Any], root: dict[str, Any]) -> pl.DataType:
    schema = _resolve(schema, root)
    kind = _kind(schema)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        return pl.List(_dtype(schema.get("items") or {}, root))
    if kind == "object" and schema.get("properties"):
        fields = {k: _dtype(v, root) for k, v in schema["properties"].items()}
        return pl.Struct(fields)
    raise _Mismatch


def _coerce(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str) -> Any:
    schema = _resolve(schema, root)
    if value is None:
        return None
    kind = _kind(schema)
    where = f"field {path!r}: " if path else ""
    if kind == "object" and schema.get("properties"):
        if not isinstance(value, dict):
            msg = f"{where}expected an object, got {_short(value)}"
            raise _Mismatch(msg)
        return {
            k: _coerce(value.get(k), sub, root, f"{path}.{k}" if path else k)
            for k, sub in schema["properties"].items()
        }
    if kind == "array":
        if not isinstance(value, list):
            msg = f"{where}expected an array, got {_short(value)}"
            raise _Mismatch(msg)
        item = schema.get("items") or {}
        return [_coerce(v, item, root, f"{path}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, kind, where)


def _scalar(value: Any, kind: str | None, where: str) -> Any:
    try:
        if kind == "string":
            return value if isinstance(value, str) else json.dumps(value)
        if kind == "integer":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if kind == "number":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "boolean":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        msg = f"{where}expected {kind}, got {_short(value)}"
        raise _Mismatch(msg) from None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
