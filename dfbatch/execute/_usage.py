"""``report_usage``: let fn report the real tokens a call used (for stats, TPM and cost).

Call it from inside fn (sync or async); the pool reads it when the call returns.

>>> import polars as pl, dfbatch
>>> def fn(batch):
...     dfbatch.report_usage(input_tokens=10 * batch.height, output_tokens=3 * batch.height)
...     return ["ok"] * batch.height
>>> out = dfbatch.process(pl.DataFrame({"text": ["a", "b"]}), fn, progress=False)
>>> out["output"].to_list()
['ok', 'ok']
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    """Tokens reported by one call of fn (mutable, one per call)."""

    input_tokens: int = 0
    output_tokens: int = 0
    headers: dict[str, str] | None = None  # rate-limit headers seen by an HTTP adapter


_current: ContextVar[Usage | None] = ContextVar("dfbatch_usage", default=None)


def report_usage(
    input_tokens: int = 0, output_tokens: int = 0, headers: dict[str, str] | None = None
) -> None:
    """Add real token usage to the current call. Outside a dfbatch call it does nothing."""
    usage = _current.get()
    if usage is None:
        return
    usage.input_tokens += int(input_tokens)
    usage.output_tokens += int(output_tokens)
    if headers:
        usage.headers = {**(usage.headers or {}), **headers}


def begin() -> tuple[Usage, object]:
    """Start collecting usage in the current context; returns (usage, token for ``end``)."""
    usage = Usage()
    return usage, _current.set(usage)


def end(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
