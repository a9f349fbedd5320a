"""``BatchConfig``: every knob of a run, with the seed's defaults, validated up front.

The seed's defaults: 2 agents per CPU core, 4 items per batch, 8 concurrent batches per agent,
at most 32k tokens per batch, and a global cap of 16 batches in flight per CPU core.

Examples
--------
>>> from dfbatch import BatchConfig
>>> cfg = BatchConfig(items_per_batch=8)
>>> cfg.items_per_batch, cfg.token_limit, cfg.max_concurrent_batches
(8, 32768, 8)
>>> BatchConfig(token_limit=0)
Traceback (most recent call last):
...
dfbatch.errors.ConfigError: token_limit must be an integer > 0, got 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dfbatch.errors import ConfigError, did_you_mean

Oversize = Literal["error", "truncate", "call"]
Progress = Literal["auto", "widget", "bar"] | bool

_MAX_AGENTS = 65_535  # agent ids are UInt16
_MAX_ITEMS = 1_000_000
_MAX_TOKENS = 100_000_000
# the keyword arguments of ``process`` / ``aprocess`` that are not settings: a typo of one of
# them lands in ``**settings``, and the did-you-mean hint must know them
RUN_KEYWORDS = ("config", "progress", "on_event", "checkpoint", "resume", "retry_errors", "key",
                "out", "chunk_rows", "engine", "ray_address")


def cpu_cores() -> int:
    """Usable CPU cores (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Columns:
    """Names of the columns dfbatch adds. Rename any of them if your frame already uses it."""

    n_tokens: str = "n_tokens"
    batch_id: str = "batch_id"
    agent_id: str = "agent_id"
    flag: str = "plan_flag"
    output: str = "output"
    error: str = "error"
    attempts: str = "attempts"
    run_batch_id: str = "run_batch_id"
    run_agent_id: str = "run_agent_id"
    started_at: str = "started_at"
    elapsed_s: str = "elapsed_s"
    cached: str = "cached"  # only with process(..., cache=): True where the cache answered

    def plan_names(self) -> tuple[str, ...]:
        return (self.n_tokens, self.batch_id, self.agent_id, self.flag)

    def result_names(self) -> tuple[str, ...]:
        return (
            self.error,
            self.attempts,
            self.run_batch_id,
            self.run_agent_id,
            self.started_at,
            self.elapsed_s,
        )


@dataclass(frozen=True)
class BatchConfig:
    """All settings of a plan and a run. Every field has a sensible default.

    Planning: ``items_per_batch`` (4), ``token_limit`` (32768 tokens per batch), ``agents``
    (None = ``agents_per_core`` x CPU cores), ``encoding`` (tiktoken encoding name, model name,
    or a callable ``list[str] -> token counts``), ``request_overhead_tokens`` (system prompt
    tokens charged once per request), ``output_tokens_per_row`` (expected output tokens per
    row; providers charge ``max_tokens`` against TPM), ``request_weight`` (fixed per-request
    cost in token units used to balance agents: load = request_weight + batch tokens).

    Running: ``max_concurrent_batches`` (8 per agent), ``max_in_flight`` (None = 16 x CPU
    cores, global), ``max_bytes_per_agent`` (1 GiB of batch data in flight per agent),
    ``timeout`` (seconds per call, None = no timeout; a plain fn's call is timed from its start
    in a worker, not from its wait for one), ``max_attempts`` (calls per batch before
    bisecting / failing), ``backoff_base`` / ``backoff_max`` (seconds, full-jitter exponential),
    ``retry_on`` (predicate ``exc -> bool | None`` overriding the retry classification),
    ``oversize`` (a single row over ``token_limit``: "error" value, "truncate" the text, or
    "call" anyway), ``send_null`` (False: a null or empty text, flagged ``"null_text"`` by the
    plan, gets the error value ``"null_text"`` without a call; True sends it), ``rpm`` /
    ``tpm`` (global rate limits; token buckets that start holding one second's worth --
    at most ``rate_burst`` minutes, default 0.1 -- since providers often enforce a
    per-minute limit per second, and grow as far as the provider's
    ``x-ratelimit-remaining-*`` headers show its bucket to be),
    ``adaptive`` (AIMD concurrency on 429s), ``steal`` (idle agents take planned work from
    busy ones), ``dynamic_batching`` (resize pending batches from recent errors / latency /
    a binding request rate -- only up to the size that finishes the rows not yet sent soonest,
    so the run does not end on a few long calls; see ``dfbatch.execute._sizing``),
    ``target_latency_s`` (grow batches while calls are faster than this),
    ``hedge_after`` (tail defenses, on by default: a latency quantile, default 0.9; a call
    older than its *size's* expected latency (fitted online from answered calls) times that
    quantile of the spread gets a duplicate in the run's tail, an outlier at any time, the first
    answer wins; a call far past its size's latency is cut and retried (adaptive timeout, never
    over ``timeout``); under a heavy-tailed latency, a call past the age where a fresh call is
    expected to finish sooner is cut and resent at once while work waits (once per batch), and
    in the run's tail hedged from that age; ``None`` / ``False`` turns them off),
    ``hedge_budget`` (the most extra calls -- duplicates and resends together -- as a fraction
    of calls so far, default 0.05; no duplicate while work is queued and the TPM / RPM bucket
    binds; under a light tail, duplicates keep a reserve for the run's last calls),
    ``outage_timeout`` (seconds, default 600: when no call has been
    answered for this long while calls keep failing with outages -- connection errors,
    timeouts, 5xx -- or rate-limit 429s, the run stops with ``RunStoppedError``, its
    ``.partial`` holding the rows done and a checkpointed run resumable; on time, though calls
    sleep out a longer Retry-After; under ``engine="ray"`` too; None = wait for ever),
    ``executor`` (where a plain-function fn runs: ``"thread"``, the
    default, in worker threads; ``"inline"`` on the event loop's thread, for a cheap fn that
    should not pay a thread hop per batch (it blocks the loop while it runs: no timeout, no
    live dashboard updates during a call); ``"process"`` in a pool of processes, for CPU-bound
    work (fn must pickle: a module-level function). A call past ``timeout`` (or cancelled) in
    a process has its worker killed (SIGKILL) and replaced, the calls in the other workers
    untouched; one in a thread, which cannot be stopped, keeps running (``StillRunningWarning``
    at the end), and the pool gets a thread more meanwhile, so the calls after it do not wait
    for its thread), ``sync_workers`` (threads or processes
    for a plain-function fn; None = min(64, global in-flight cap) threads, one process per
    core), ``seed`` (jitter RNG).

    Result: ``columns`` (the names of the added columns, ``Columns`` or a dict of its fields),
    ``output_dtype`` (the outputs' Polars type, e.g. ``pl.Int64``, or a dict column -> type
    for several output columns; None = the first batch's types). Outputs of a later batch
    that do not fit the run's type become row errors, never a failed run.
    """

    items_per_batch: int = 4
    token_limit: int = 32_768
    agents: int | None = None
    agents_per_core: int = 2
    encoding: str | Callable[[list[str]], Any] = "cl100k_base"
    request_overhead_tokens: int = 0
    output_tokens_per_row: int = 0
    request_weight: int = 256
    max_concurrent_batches: int = 8
    max_in_flight: int | None = None
    max_bytes_per_agent: int = 1 << 30
    timeout: float | None = 600.0
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    retry_on: Callable[[BaseException], bool | None] | None = None
    oversize: Oversize = "error"
    send_null: bool = False
    rpm: float | None = None
    tpm: float | None = None
    rate_burst: float = 0.1
    adaptive: bool = True
    steal: bool = True
    dynamic_batching: bool = True
    target_latency_s: float | None = None
    hedge_after: float | bool | None = 0.9
    hedge_budget: float = 0.05
    outage_timeout: float | None = 600.0
    executor: str = "thread"
    sync_workers: int | None = None
    seed: int | None = None
    columns: Columns = field(default_factory=Columns)
    output_dtype: Any = None

    def __post_init__(self) -> None:
        self._coerce()
        _positive_int("items_per_batch", self.items_per_batch, _MAX_ITEMS)
        _positive_int("token_limit", self.token_limit, _MAX_TOKENS)
        if self.agents is not None:
            _positive_int("agents", self.agents, _MAX_AGENTS)
        _positive_int("agents_per_core", self.agents_per_core, 1024)
        _non_negative_int("request_overhead_tokens", self.request_overhead_tokens)
        _non_negative_int("output_tokens_per_row", self.output_tokens_per_row)
        _non_negative_int("request_weight", self.request_weight)
        _positive_int("max_concurrent_batches", self.max_concurrent_batches, 100_000)
        if self.max_in_flight is not None:
            _positive_int("max_in_flight", self.max_in_flight, 1_000_000)
        _positive_int("max_bytes_per_agent", self.max_bytes_per_agent, 1 << 50)
        if self.timeout is not None:
            _positive_float("timeout", self.timeout)
        _positive_int("max_attempts", self.max_attempts, 1000)
        _positive_float("backoff_base", self.backoff_base, allow_zero=True)
        _positive_float("backoff_max", self.backoff_max, allow_zero=True)
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None:
                _positive_float(name, value)
        if not (isinstance(self.rate_burst, (int, float)) and 0 < self.rate_burst <= 1):
            msg = f"rate_burst must be a fraction of a minute in (0, 1], got {self.rate_burst!r}"
            raise ConfigError(msg)
        if self.oversize not in ("error", "truncate", "call"):
            msg = f"oversize must be 'error', 'truncate' or 'call', got {self.oversize!r}"
            raise ConfigError(msg)
        if self.target_latency_s is not None:
            _positive_float("target_latency_s", self.target_latency_s)
        if self.hedge_after is False or self.hedge_after is True:  # off / the default quantile
            object.__setattr__(self, "hedge_after", 0.9 if self.hedge_after else None)
        if self.hedge_after is not None and not (
            isinstance(self.hedge_after, float) and 0 < self.hedge_after < 1
        ):
            msg = (
                "hedge_after must be a latency quantile in (0, 1), e.g. 0.9, or None / False "
                f"to turn hedging off, got {self.hedge_after!r}"
            )
            raise ConfigError(msg)
        if isinstance(self.hedge_budget, bool) or not (
                isinstance(self.hedge_budget, (int, float)) and 0 <= self.hedge_budget <= 1):
            msg = (
                "hedge_budget must be the most hedged calls as a fraction of calls in [0, 1], "
                f"e.g. 0.05 (0: no extra call; hedge_after=None turns hedging off), got "
                f"{self.hedge_budget!r}"
            )
            raise ConfigError(msg)
        if self.outage_timeout is not None:
            _positive_float("outage_timeout", self.outage_timeout)
        if self.sync_workers is not None:
            _positive_int("sync_workers", self.sync_workers, 4096)
        if self.executor not in ("thread", "inline", "process"):
            msg = (f"executor must be 'thread' (worker threads, the default), 'inline' (on the "
                   f"event loop's thread, for cheap functions) or 'process' (a process pool, "
                   f"for CPU-bound work), got {self.executor!r}")
            raise ConfigError(msg)
        if self.retry_on is not None and not callable(self.retry_on):
            msg = f"retry_on must be a callable exc -> bool | None, got {self.retry_on!r}"
            raise ConfigError(msg)
        if not (isinstance(self.encoding, str) or callable(self.encoding)):
            msg = (
                "encoding must be a tiktoken encoding name (e.g. 'cl100k_base'), a model name "
                f"(e.g. 'gpt-4o') or a callable list[str] -> counts, got {self.encoding!r}"
            )
            raise ConfigError(msg)
        _check_output_dtype(self.output_dtype)
        names = [getattr(self.columns, f.name) for f in dataclasses.fields(self.columns)]
        if len(set(names)) != len(names):
            msg = f"columns must have distinct names, got {names}"
            raise ConfigError(msg)

    def _coerce(self) -> None:
        """NumPy scalars become Python numbers; a ``columns`` dict becomes ``Columns``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or type(value) in (int, float):
                continue
            if isinstance(value, numbers.Integral):  # e.g. np.int64(4)
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real) and f.name != "encoding":
                object.__setattr__(self, f.name, float(value))
        if isinstance(self.columns, Mapping):
            object.__setattr__(self, "columns", _columns(self.columns))
        elif not isinstance(self.columns, Columns):
            msg = (f"columns must be dfbatch.Columns(...) or a dict of its fields, e.g. "
                   f"{{'output': 'answer'}}, got {type(self.columns).__name__}")
            raise ConfigError(msg)

    # -- derived values --------------------------------------------------------------------
    @property
    def n_agents(self) -> int:
        """Agents to plan for: ``agents`` or ``agents_per_core`` x CPU cores (the seed's rule)."""
        return self.agents if self.agents is not None else self.agents_per_core * cpu_cores()

    @property
    def in_flight_cap(self) -> int:
        """Global cap on batches in flight: ``max_in_flight`` or 16 x CPU cores."""
        return self.max_in_flight if self.max_in_flight is not None else 16 * cpu_cores()

    @classmethod
    def from_kwargs(cls, config: BatchConfig | None = None, /, **kwargs: Any) -> BatchConfig:
        """Build a config from keyword arguments, on top of ``config`` when given.

        Unknown names are an error with a did-you-mean hint.

        >>> BatchConfig.from_kwargs(items_per_bach=2)
        Traceback (most recent call last):
        ...
        dfbatch.errors.ConfigError: unknown setting 'items_per_bach'. Hint: did you mean ...?
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                hint = did_you_mean(key, [*known, *RUN_KEYWORDS])
                msg = f"unknown setting {key!r}.{hint}"
                raise ConfigError(msg)
        base = config if config is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base

    def replace(self, **kwargs: Any) -> BatchConfig:
        return BatchConfig.from_kwargs(self, **kwargs)

    def as_dict(self) -> Mapping[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _check_output_dtype(value: Any) -> None:
    if value is None:
        return
    import polars as pl

    def is_dtype(x: Any) -> bool:
        return isinstance(x, pl.DataType) or (isinstance(x, type) and issubclass(x, pl.DataType))

    items = value.values() if isinstance(value, Mapping) else [value]
    if not all(is_dtype(x) for x in items):
        msg = ("output_dtype must be a Polars type (e.g. pl.Int64, pl.List(pl.String)) or a "
               f"dict column -> type, got {value!r}")
        raise ConfigError(msg)


def _columns(names: Mapping[Any, Any]) -> Columns:
    fields = [f.name for f in dataclasses.fields(Columns)]
    for k, v in names.items():
        if k not in fields:
            msg = f"columns has no field {k!r}.{did_you_mean(str(k), fields)} (fields: {fields})"
            raise ConfigError(msg)
        if not isinstance(v, str) or not v:
            msg = f"columns[{k!r}] must be a column name (a non-empty str), got {v!r}"
            raise ConfigError(msg)
    return Columns(**names)


def _positive_int(name: str, value: object, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        msg = f"{name} must be an integer > 0, got {value!r}"
        raise ConfigError(msg)
    if value > upper:
        msg = f"{name}={value} is absurdly large (max {upper:,}); pick a smaller value"
        raise ConfigError(msg)


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        msg = f"{name} must be an integer >= 0, got {value!r}"
        raise ConfigError(msg)


def _positive_float(name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:  # NaN compares false with everything: reject it explicitly, and infinity too
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)  # type: ignore[arg-type,operator]
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"{name} must be a finite number {bound} (seconds / per minute), got {value!r}"
        raise ConfigError(msg)
