"""Planning: pack rows into batches and balance batches over agents. Pure, vectorized, no I/O.

The algorithms live in ``dfbatch.plan._pack`` (rows into batches) and ``dfbatch.plan._balance``
(batches over agents); this module counts tokens, runs both and builds the frame.

``plan`` adds four columns (names from ``BatchConfig.columns``):

- ``n_tokens`` (UInt32): exact tokens of the row's text (0 for a null text).
- ``batch_id`` (UInt32): ``0..B-1``, numbered in order of each batch's first row.
- ``agent_id`` (UInt16): the agent planned to send the batch.
- ``plan_flag`` (String): null when fine, ``"null_text"`` or ``"oversize"``.

Token accounting. A batch becomes one request. Its request tokens are
``request_overhead_tokens + sum(n_tokens + output_tokens_per_row)`` over its rows (the system
prompt once per request, and the expected output of every row, since providers charge
``max_tokens`` against TPM). Packing keeps that ``<= token_limit`` and ``<= items_per_batch``
rows per batch. A row whose request alone would exceed ``token_limit`` sits alone in its batch
and is flagged ``"oversize"``; the pool decides what to do with it (an error value by default).

Load. Agents are balanced on a latency-like weight per batch: a fixed per-request cost
``request_weight`` plus the batch's request tokens. The heaviest agent's load is reported as a
ratio to the lower bound ``max(total / agents, heaviest batch)``.

Examples
--------
>>> import polars as pl, dfbatch
>>> df = pl.DataFrame({"text": ["a b c", "d", None, "e f g h i j k l"]})
>>> words = lambda texts: [len(t.split()) for t in texts]
>>> dfbatch.plan(df, encoding=words, items_per_batch=2, token_limit=6, agents=2)
shape: (4, 5)
┌─────────────────┬──────────┬──────────┬──────────┬───────────┐
│ text            ┆ n_tokens ┆ batch_id ┆ agent_id ┆ plan_flag │
│ ---             ┆ ---      ┆ ---      ┆ ---      ┆ ---       │
│ str             ┆ u32      ┆ u32      ┆ u16      ┆ str       │
╞═════════════════╪══════════╪══════════╪══════════╪═══════════╡
│ a b c           ┆ 3        ┆ 0        ┆ 1        ┆ null      │
│ d               ┆ 1        ┆ 0        ┆ 1        ┆ null      │
│ null            ┆ 0        ┆ 1        ┆ 1        ┆ null_text │
│ e f g h i j k l ┆ 8        ┆ 2        ┆ 0        ┆ oversize  │
└─────────────────┴──────────┴──────────┴──────────┴───────────┘
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig, Columns
from dfbatch.errors import ColumnError, ConfigError, did_you_mean

# pack, balance and balance_ratio are also re-exported: `from dfbatch.plan import pack` works.
from dfbatch.plan._balance import balance, balance_ratio
from dfbatch.plan._pack import pack
from dfbatch.plan._tokens import count_tokens

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)

NULL_TEXT = "null_text"
OVERSIZE = "oversize"
_FIELD = ("n_tokens", "batch_id", "agent_id", "flag")


# -- plan ----------------------------------------------------------------------------------
def plan(
    df: Frame, text: str | pl.Expr = "text", *, config: BatchConfig | None = None, **kwargs: Any
) -> Frame:
    """Add ``n_tokens``, ``batch_id``, ``agent_id`` and ``plan_flag`` columns (see the module doc).

    Parameters
    ----------
    df
        A DataFrame, or a LazyFrame (the result is then lazy and plans the collected frame).
    text
        The text column name, or an expression such as ``pl.concat_str("title", "body")``.
    config, **kwargs
        A ``BatchConfig`` and/or its fields: ``items_per_batch``, ``token_limit``, ``agents``,
        ``encoding``, ``request_overhead_tokens``, ``output_tokens_per_row``,
        ``request_weight``, ``columns``.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> lf = pl.LazyFrame({"doc": ["hello world", "🧠 polars", ""]})
    >>> dfbatch.plan(lf, "doc", items_per_batch=2, agents=1).collect()
    shape: (3, 5)
    ┌─────────────┬──────────┬──────────┬──────────┬───────────┐
    │ doc         ┆ n_tokens ┆ batch_id ┆ agent_id ┆ plan_flag │
    │ ---         ┆ ---      ┆ ---      ┆ ---      ┆ ---       │
    │ str         ┆ u32      ┆ u32      ┆ u16      ┆ str       │
    ╞═════════════╪══════════╪══════════╪══════════╪═══════════╡
    │ hello world ┆ 2        ┆ 0        ┆ 0        ┆ null      │
    │ 🧠 polars   ┆ 5        ┆ 0        ┆ 0        ┆ null      │
    │             ┆ 0        ┆ 1        ┆ 0        ┆ null      │
    └─────────────┴──────────┴──────────┴──────────┴───────────┘
    """
    cfg = BatchConfig.from_kwargs(config, **kwargs)
    _check_limits(cfg)
    if isinstance(df, pl.LazyFrame):
        schema = df.collect_schema()
        expr = _text_expr(schema, text, cfg.columns)
        out_schema = pl.Schema({**dict(schema), **_plan_schema(cfg.columns)})
        return df.map_batches(
            lambda frame: _plan_frame(frame, expr, cfg),
            schema=out_schema,
            predicate_pushdown=False,
            projection_pushdown=False,
            slice_pushdown=False,
            streamable=False,
        )
    if not isinstance(df, pl.DataFrame):
        msg = f"plan needs a polars DataFrame or LazyFrame, got {type(df).__name__}"
        raise ConfigError(msg)
    return _plan_frame(df, _text_expr(df.schema, text, cfg.columns), cfg)


def _plan_schema(cols: Columns) -> dict[str, pl.DataType]:
    return {
        cols.n_tokens: pl.UInt32(),
        cols.batch_id: pl.UInt32(),
        cols.agent_id: pl.UInt16(),
        cols.flag: pl.String(),
    }


def _check_limits(cfg: BatchConfig) -> None:
    fixed = cfg.request_overhead_tokens + cfg.output_tokens_per_row
    if fixed >= cfg.token_limit:
        msg = (
            f"request_overhead_tokens ({cfg.request_overhead_tokens}) + output_tokens_per_row "
            f"({cfg.output_tokens_per_row}) leave no room for text under token_limit "
            f"({cfg.token_limit}); raise token_limit or lower them"
        )
        raise ConfigError(msg)


def _text_expr(schema: pl.Schema, text: str | pl.Expr, cols: Columns) -> pl.Expr:
    """Validate the frame's columns and the text; return a String expression for the text."""
    clash = [f for f in _FIELD if getattr(cols, f) in schema]
    if len(clash) == len(_FIELD):
        names = [getattr(cols, f) for f in _FIELD]
        msg = f"this frame is already planned (it has {names}); plan it once, or df.drop({names})"
        raise ColumnError(msg)
    if clash:
        name = getattr(cols, clash[0])
        msg = (
            f"column {name!r} already exists and dfbatch never overwrites it; rename dfbatch's "
            f"column with columns=dfbatch.Columns({clash[0]}='{name}_2'), or rename yours"
        )
        raise ColumnError(msg)
    if isinstance(text, str):
        if text not in schema:
            msg = f"text column {text!r} not found in {list(schema)}.{did_you_mean(text, schema)}"
            raise ColumnError(msg)
        expr, label = pl.col(text), text
    elif isinstance(text, pl.Expr):
        expr, label = text, str(text)
    else:
        msg = f"text must be a column name or a polars expression, got {type(text).__name__}"
        raise ConfigError(msg)
    return _as_string(expr, label, schema)


def _as_string(expr: pl.Expr, label: str, schema: pl.Schema) -> pl.Expr:
    try:
        out = pl.LazyFrame(schema=schema).select(expr).collect_schema()
    except pl.exceptions.ColumnNotFoundError as e:
        missing = [r for r in expr.meta.root_names() if r not in schema]
        hint = did_you_mean(missing[0], schema) if missing else ""
        msg = f"text expression {label} uses a missing column {missing or ''}.{hint}"
        raise ColumnError(msg) from e
    if len(out) != 1:
        msg = f"text must give one column, got {len(out)} ({list(out)}); use pl.concat_str(...)"
        raise ConfigError(msg)
    dtype = next(iter(out.values()))
    if dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(dtype, pl.Enum):
        return expr.cast(pl.String)
    msg = (
        f"text {label} has dtype {dtype}, but token counting needs strings; pass "
        f"text=pl.col(...).cast(pl.Utf8) to count its string form"
    )
    raise ConfigError(msg)


def _plan_frame(df: pl.DataFrame, expr: pl.Expr, cfg: BatchConfig) -> pl.DataFrame:
    texts = df.select(expr).to_series()
    if len(texts) != df.height:
        if len(texts) != 1:
            msg = f"text expression gave {len(texts)} values for {df.height} rows"
            raise ConfigError(msg)
        texts = texts.new_from_index(0, df.height)
    n_tokens = count_tokens(texts, cfg.encoding)
    limit = cfg.token_limit - cfg.request_overhead_tokens
    costs = n_tokens.to_numpy().astype(np.int64) + cfg.output_tokens_per_row
    batch = pack(costs, cfg.items_per_batch, limit)
    weights = _batch_weights(batch, costs, cfg)
    agent = balance(weights, cfg.n_agents)[batch] if len(batch) else np.zeros(0, np.uint16)
    cols = cfg.columns
    flag = (
        pl.when(pl.lit(texts.is_null()))
        .then(pl.lit(NULL_TEXT))
        .when(pl.lit(pl.Series(costs > limit)))
        .then(pl.lit(OVERSIZE))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    return df.with_columns(
        n_tokens.alias(cols.n_tokens),
        pl.Series(cols.batch_id, batch, dtype=pl.UInt32),
        pl.Series(cols.agent_id, agent, dtype=pl.UInt16),
        flag.alias(cols.flag),
    )


def _batch_weights(batch: np.ndarray, costs: np.ndarray, cfg: BatchConfig) -> np.ndarray:
    """Latency-like load of each batch: request_weight + overhead + its rows' tokens."""
    tokens = np.bincount(batch, weights=costs) if len(batch) else np.zeros(0)
    return cfg.request_weight + cfg.request_overhead_tokens + tokens


# -- summary -------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False, eq=False)
class PlanSummary:
    """What a plan will send: sizes, flagged rows, per-agent load, balance and estimated cost."""

    rows: int
    batches: int
    agents: int
    tokens: int
    request_tokens: int
    max_batch_tokens: int
    null_text: int
    oversize: int
    loads: pl.DataFrame
    balance_ratio: float
    lower_bound: float
    cost_in: float | None = None
    cost_out: float | None = None
    batch_discount: float | None = None  # the Batch API's price / the synchronous price
    cached: int = 0  # rows the response cache answers: not counted above, not priced

    @property
    def flagged(self) -> int:
        return self.null_text + self.oversize

    @property
    def cost(self) -> float | None:
        if self.cost_in is None and self.cost_out is None:
            return None
        return (self.cost_in or 0.0) + (self.cost_out or 0.0)

    @property
    def batch_cost(self) -> float | None:
        """The estimated cost through the provider's Batch API (``batch_discount`` given)."""
        if self.cost is None or self.batch_discount is None:
            return None
        return self.cost * self.batch_discount

    def __str__(self) -> str:
        lines = [
            f"plan: {self.rows:,} rows in {self.batches:,} batches over {self.agents:,} agents",
            f"tokens: {self.tokens:,} in texts, {self.request_tokens:,} in requests "
            f"(max batch {self.max_batch_tokens:,})",
            f"flagged: {self.null_text:,} null_text, {self.oversize:,} oversize",
            f"balance: heaviest agent {self.balance_ratio:.4f} x lower bound "
            f"{self.lower_bound:,.0f} (load = per-request weight + tokens)",
        ]
        if self.cost is not None:
            lines.append(
                f"est. cost: ${self.cost:,.4f} (input ${self.cost_in or 0:,.4f}, "
                f"output ${self.cost_out or 0:,.4f})"
            )
        if self.cost is not None and self.batch_discount is not None:
            batch = self.cost * self.batch_discount
            lines.append(
                f"batch API: ${batch:,.4f} vs ${self.cost:,.4f} synchronous "
                f"(saves ${self.cost - batch:,.4f}, {1 - self.batch_discount:.0%})"
            )
        if self.cached:
            lines.append(f"cached: {self.cached:,} more rows answered by the cache (not sent)")
        return "\n".join(lines)

    __repr__ = __str__


def summary(
    planned: pl.DataFrame,
    *,
    price_in_per_1k: float | None = None,
    price_out_per_1k: float | None = None,
    config: BatchConfig | None = None,
    batch_discount: float | None = None,
    cached: Any = None,
    **kwargs: Any,
) -> PlanSummary:
    """Summarize a planned frame: rows, batches, tokens, flagged rows, agent loads and cost.

    Pass the ``config`` / settings used to plan (overhead, output tokens, agents) for exact
    request tokens and loads. The cost estimate counts every row but ``null_text`` ones (an
    oversize row counts in full): input = text tokens + ``request_overhead_tokens`` per
    request, output = ``output_tokens_per_row`` per row. ``batch_discount`` (0.5 for OpenAI's
    Batch API) adds the price of the same requests sent as batch jobs beside it. ``cached`` (a
    boolean mask, one per row; ``df.batch.summary(fn=..., cache=...)`` computes it) leaves out
    the rows the response cache answers: they are counted in ``cached`` and priced at nothing.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> df = pl.DataFrame({"text": ["hello world"] * 6 + [None]})
    >>> planned = dfbatch.plan(df, agents=2, request_weight=10)
    >>> s = dfbatch.summary(planned, price_in_per_1k=0.5, agents=2, request_weight=10)
    >>> s
    plan: 7 rows in 2 batches over 2 agents
    tokens: 12 in texts, 12 in requests (max batch 8)
    flagged: 1 null_text, 0 oversize
    balance: heaviest agent 1.0000 x lower bound 18 (load = per-request weight + tokens)
    est. cost: $0.0060 (input $0.0060, output $0.0000)
    >>> print(dfbatch.summary(planned, price_in_per_1k=0.5, batch_discount=0.5, agents=2,
    ...                       request_weight=10).batch_cost)
    0.003
    >>> s.loads
    shape: (2, 5)
    ┌──────────┬─────────┬──────┬────────┬──────┐
    │ agent_id ┆ batches ┆ rows ┆ tokens ┆ load │
    │ ---      ┆ ---     ┆ ---  ┆ ---    ┆ ---  │
    │ u16      ┆ u32     ┆ u32  ┆ i64    ┆ i64  │
    ╞══════════╪═════════╪══════╪════════╪══════╡
    │ 0        ┆ 1       ┆ 4    ┆ 8      ┆ 18   │
    │ 1        ┆ 1       ┆ 3    ┆ 4      ┆ 14   │
    └──────────┴─────────┴──────┴────────┴──────┘
    """
    explicit_agents = config is not None or "agents" in kwargs
    cfg = BatchConfig.from_kwargs(config, **kwargs)
    if isinstance(planned, pl.LazyFrame):
        planned = planned.collect()
    cols = cfg.columns
    missing = [name for name in cols.plan_names() if name not in planned.columns]
    if missing:
        msg = f"summary needs a planned frame, missing {missing}; call df.batch.plan(...) first"
        raise ColumnError(msg)
    n_cached = 0
    if cached is not None:
        mask = pl.Series(cached, dtype=pl.Boolean)
        n_cached = int(mask.sum())
        planned = planned.filter(~mask)
    per_batch = _per_batch(planned, cfg)
    max_agent = int(per_batch["agent_id"].max() or 0) if per_batch.height else 0  # type: ignore[arg-type]
    n_agents = max(cfg.n_agents if explicit_agents else 1, max_agent + 1)
    loads = _agent_loads(per_batch, n_agents)
    w = per_batch["load"].to_numpy()
    sent_rows = int(per_batch["sent_rows"].sum())
    tokens_in = int(per_batch["sent_tokens"].sum()) + cfg.request_overhead_tokens * int(
        (per_batch["sent_rows"] > 0).sum()
    )
    flags = planned[cols.flag]
    return PlanSummary(
        rows=planned.height,
        batches=per_batch.height,
        agents=n_agents,
        tokens=int(per_batch["tokens"].sum()),
        request_tokens=int(per_batch["request_tokens"].sum()),
        max_batch_tokens=int(per_batch["request_tokens"].max() or 0),  # type: ignore[arg-type]
        null_text=int((flags == NULL_TEXT).sum()),
        oversize=int((flags == OVERSIZE).sum()),
        loads=loads,
        balance_ratio=balance_ratio(w, per_batch["agent_id"].to_numpy(), n_agents),
        lower_bound=float(max(w.sum() / n_agents, w.max())) if len(w) else 0.0,
        cost_in=None if price_in_per_1k is None else tokens_in / 1000 * price_in_per_1k,
        cost_out=None
        if price_out_per_1k is None
        else cfg.output_tokens_per_row * sent_rows / 1000 * price_out_per_1k,
        batch_discount=_discount(batch_discount),
        cached=n_cached,
    )


def _discount(value: float | None) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
        msg = f"batch_discount must be in (0, 1] (0.5 = the Batch API's half price), got {value!r}"
        raise ConfigError(msg)
    return value


def _per_batch(planned: pl.DataFrame, cfg: BatchConfig) -> pl.DataFrame:
    cols = cfg.columns
    sent = pl.col(cols.flag).fill_null("") != NULL_TEXT
    tokens = pl.col(cols.n_tokens).cast(pl.Int64)
    return (
        planned.group_by(cols.batch_id)
        .agg(
            pl.col(cols.agent_id).first().alias("agent_id"),
            pl.len().cast(pl.UInt32).alias("rows"),
            tokens.sum().alias("tokens"),
            sent.sum().cast(pl.UInt32).alias("sent_rows"),
            tokens.filter(sent).sum().alias("sent_tokens"),
        )
        .with_columns(
            request_tokens=cfg.request_overhead_tokens
            + pl.col("tokens")
            + cfg.output_tokens_per_row * pl.col("rows").cast(pl.Int64)
        )
        .with_columns(load=cfg.request_weight + pl.col("request_tokens"))
        .sort(cols.batch_id)
    )


def _agent_loads(per_batch: pl.DataFrame, n_agents: int) -> pl.DataFrame:
    agents = pl.DataFrame({"agent_id": pl.arange(0, n_agents, eager=True).cast(pl.UInt16)})
    per_agent = per_batch.group_by("agent_id").agg(
        pl.len().cast(pl.UInt32).alias("batches"),
        pl.col("rows").sum().cast(pl.UInt32),
        pl.col("tokens").sum(),
        pl.col("load").sum(),
    )
    return (
        agents.join(per_agent, on="agent_id", how="left")
        .with_columns(
            pl.col("batches", "rows").fill_null(0),
            pl.col("tokens", "load").fill_null(0),
        )
        .sort("agent_id")
    )
