"""``report_usage``: let fn report the real tokens a call used (for stats, TPM and cost).

Call it from inside fn (sync or async), before fn returns: the pool reads it when the call
returns, and then the call's usage is closed. A report after that (from a task or thread that
outlived the call) is ignored everywhere -- the live view, the events, the TPM limit -- with one
``LateUsageWarning`` per run: the call's outcome was already recorded and told, so counting it
in one place but not another would make the dashboard's totals and the events' disagree.

>>> import polars as pl, dfbatch
>>> def fn(batch):
...     dfbatch.report_usage(input_tokens=10 * batch.height, output_tokens=3 * batch.height)
...     return ["ok"] * batch.height
>>> out = dfbatch.process(pl.DataFrame({"text": ["a", "b"]}), fn, progress=False)
>>> out["output"].to_list()
['ok', 'ok']
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass

from dfbatch.errors import ConfigError, LateUsageWarning, warn_user


class LateReports:
    """A run's reports that came after their call had returned (``warned``: told once)."""

    __slots__ = ("warned",)

    def __init__(self) -> None:
        self.warned = False


@dataclass(slots=True)
class Usage:
    """Tokens reported by one call of fn (mutable, one per call, until ``closed``)."""

    input_tokens: int = 0
    output_tokens: int = 0
    headers: dict[str, str] | None = None  # rate-limit headers seen by an HTTP adapter
    closed: bool = False  # the call returned: later reports are ignored
    late: LateReports | None = None  # the run's, to warn once


_current: ContextVar[Usage | None] = ContextVar("dfbatch_usage", default=None)


def report_usage(
    input_tokens: int = 0, output_tokens: int = 0, headers: dict[str, str] | None = None
) -> None:
    """Add the real token usage of the current call of fn (what the provider billed), and its
    answer's headers (``x-ratelimit-*``, ``retry-after``: the run's limits learn from them).

    The run's TPM bucket is corrected from the estimate it charged to these tokens, and the
    live view, the events and ``RunStats`` count them. Call it before fn returns: a report from
    a task that outlives the call is ignored (``LateUsageWarning``, once a run). Outside a
    dfbatch call it does nothing. ``dfbatch.llm.chat`` / ``embed`` report for you.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> def fn(batch: pl.DataFrame) -> list[str]:
    ...     dfbatch.report_usage(input_tokens=12 * len(batch), output_tokens=3 * len(batch),
    ...                          headers={"x-ratelimit-remaining-tokens": "149000"})
    ...     return batch["text"].str.to_uppercase().to_list()
    >>> df = pl.DataFrame({"text": ["a", "b", "c"]})
    >>> events = []
    >>> out = dfbatch.process(df, fn, progress=False, on_event=events.append)
    >>> stats = dfbatch.events.fold(events)
    >>> stats.input_tokens, stats.output_tokens
    (36, 9)
    >>> dfbatch.report_usage(input_tokens=5)  # outside a run: nothing happens
    """
    usage = _current.get()
    if usage is None:
        return
    for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 <= value < math.inf:
            msg = (f"report_usage({name}={value!r}): pass the number of tokens the provider "
                   f"billed, an int >= 0 (e.g. response.usage.prompt_tokens), or leave it out")
            raise ConfigError(msg)
    if usage.closed:
        _late(usage.late)
        return
    usage.input_tokens += int(input_tokens)
    usage.output_tokens += int(output_tokens)
    if headers:
        usage.headers = {**(usage.headers or {}), **headers}


def _late(late: LateReports | None) -> None:
    if late is not None:
        if late.warned:
            return
        late.warned = True
    msg = ("dfbatch.report_usage was called after its call of fn had returned (from a task or "
           "thread that outlived the call): those tokens are not counted, neither in the live "
           "view nor in the events or the TPM limit. Call report_usage before fn returns "
           "(await the task that reports it).")
    warn_user(msg, LateUsageWarning)


def begin(late: LateReports | None = None) -> tuple[Usage, object]:
    """Start collecting usage in the current context; returns (usage, token for ``end``).
    ``late``: the run's record of reports after their call returned (one warning a run)."""
    usage = Usage(late=late)
    return usage, _current.set(usage)


def end(token: object, usage: Usage | None = None) -> None:
    """The call of ``usage`` (``begin``'s; by default the context's) is over: it is closed
    (later reports are ignored) and the context's previous usage is back."""
    if usage is None:
        usage = _current.get()
    if usage is not None:
        usage.closed = True
    _current.reset(token)  # type: ignore[arg-type]
