"""Batch mode: one chat request for a whole batch, rows sent as a numbered JSON list.

The model is asked for ``{"results": [{"id": <n>, "output": <answer>}, ...]}`` (enforced with
a JSON-schema response format wrapping the per-row schema, if any). ``parse_results`` maps the
answer back by id; a row whose id is missing, duplicated or malformed gets its own ``RowError``
saying why, the other rows keep their answers.

Examples
--------
>>> from dfbatch.llm.batchmode import user_message, parse_results
>>> print(user_message(["Summarize: a", "Summarize: b"]))
Items (2):
[{"id": 1, "input": "Summarize: a"}, {"id": 2, "input": "Summarize: b"}]
>>> parse_results('{"results": [{"id": 2, "output": "B"}, {"id": 1, "output": "A"}]}', 2)
['A', 'B']
>>> parse_results('{"results": [{"id": 1, "output": "A"}]}', 2)
['A', RowError('batch answer has no result for item 2 (got ids [1])')]
"""

from __future__ import annotations

import copy
import json
from typing import Any

from dfbatch.errors import RowError
from dfbatch.llm.schema import strip_fences

ITEM_OVERHEAD_TOKENS = 12  # '{"id": 12, "output": ""}, ' around each answer
INSTRUCTIONS = (
    'You will receive a JSON array of items, each {{"id": <number>, "input": <task>}}. '
    "Do each item's task independently. Reply with one JSON object "
    '{{"results": [{{"id": <the item\'s id>, "output": {output}}}, ...]}} '
    "holding exactly one result per item, with the same ids."
)


def system_message(system: str | None, schema: dict[str, Any] | None) -> str:
    output = "<an object matching the output schema>" if schema is not None else "<your answer>"
    text = INSTRUCTIONS.format(output=output)
    return f"{system}\n\n{text}" if system else text


def user_message(prompts: list[str]) -> str:
    items = [{"id": i, "input": p} for i, p in enumerate(prompts, start=1)]
    return f"Items ({len(items)}):\n" + json.dumps(items, ensure_ascii=False)


def response_format(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-schema response format for ``{"results": [{"id", "output"}]}``."""
    output: dict[str, Any] = {"type": "string"}
    defs: dict[str, Any] = {}
    if schema is not None:
        output = copy.deepcopy(schema)
        defs = output.pop("$defs", {})
        output.pop("title", None)
    item = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "output": output},
        "required": ["id", "output"],
    }
    wrapper: dict[str, Any] = {
        "type": "object",
        "properties": {"results": {"type": "array", "items": item}},
        "required": ["results"],
    }
    if defs:
        wrapper["$defs"] = defs
    return {
        "type": "json_schema",
        "json_schema": {"name": "batch_results", "schema": wrapper, "strict": False},
    }


def parse_results(content: str | None, n: int, *, truncated: bool = False) -> list[Any]:
    """One output (or ``RowError``) per item ``1..n`` from the model's batch answer."""
    why = " (the answer was cut at max_tokens: raise max_tokens or lower items_per_batch)"
    hint = why if truncated else ""
    try:
        data = json.loads(strip_fences(content or ""))
    except ValueError as e:
        return [RowError(f"batch answer is not valid JSON ({e}){hint}")] * n
    results = data.get("results") if isinstance(data, dict) else data
    if not isinstance(results, list):
        return [RowError(f"batch answer has no 'results' list{hint}")] * n
    if results and all(not isinstance(r, dict) for r in results) and len(results) == n:
        return list(results)  # a bare list of n answers: positional
    by_id: dict[int, Any] = {}
    dupes: set[int] = set()
    for r in results:
        key = _as_id(r.get("id")) if isinstance(r, dict) else None
        if key is None:
            continue
        if key in by_id:
            dupes.add(key)
        by_id[key] = r.get("output", {k: v for k, v in r.items() if k != "id"})
    seen = sorted(by_id)
    shown = seen[:20] + (["..."] if len(seen) > 20 else [])  # type: ignore[list-item]
    out: list[Any] = []
    for i in range(1, n + 1):
        if i in dupes:
            out.append(RowError(f"batch answer has several results for item {i}"))
        elif i in by_id:
            out.append(by_id[i])
        else:
            out.append(RowError(f"batch answer has no result for item {i} (got ids {shown}){hint}"))
    return out


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None
