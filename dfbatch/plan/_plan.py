"""Planning: pack rows into batches and balance batches over agents. Pure, vectorized, no I/O.

The algorithms live in ``dfbatch.plan._pack`` (rows into batches) and ``dfbatch.plan._balance``
(batches over agents); this module counts tokens, runs both and builds the frame.

``plan`` adds four columns (names from ``BatchConfig.columns``):

- ``n_tokens`` (UInt32): exact tokens of the row's text (0 for a null text).
- ``batch_id`` (UInt32): ``0..B-1``, numbered in order of each batch's first row.
- ``agent_id`` (UInt16): the agent planned to send the batch.
- ``plan_flag`` (String): null when fine, ``"null_text"`` (a null or empty text: not
  sent unless ``send_null=True``) or ``"oversize"``.

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

from typing import Any, TypeVar

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig, Columns
from dfbatch.errors import ColumnError, ConfigError, did_you_mean

# pack, balance and balance_ratio are also re-exported: `from dfbatch.plan import pack` works.
from dfbatch.plan._balance import balance, balance_ratio
from dfbatch.plan._pack import pack
from dfbatch.plan._tokens import count_tokens

__all__ = ["NULL_TEXT", "OVERSIZE", "balance", "balance_ratio", "pack", "plan", "with_fn"]

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)

NULL_TEXT = "null_text"
OVERSIZE = "oversize"
_FIELD = ("n_tokens", "batch_id", "agent_id", "flag")
_DEFAULT_OUTPUT = BatchConfig().output_tokens_per_row


# -- plan ----------------------------------------------------------------------------------
def plan(
    df: Frame, text: str | pl.Expr = "text", *, config: BatchConfig | None = None,
    fn: Any = None, **kwargs: Any,
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
    fn
        The ``fn`` you will ``process`` with: an adapter's expected output per row
        (``dfbatch_output_tokens``) fills in ``output_tokens_per_row`` as ``process`` does.

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
    │             ┆ 0        ┆ 1        ┆ 0        ┆ null_text │
    └─────────────┴──────────┴──────────┴──────────┴───────────┘
    """
    cfg = with_fn(BatchConfig.from_kwargs(config, **kwargs), fn, config, kwargs)
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


def with_fn(
    cfg: BatchConfig, fn: Any, config: BatchConfig | None, settings: dict[str, Any]
) -> BatchConfig:
    """``cfg`` with ``fn``'s expected output per row (``dfbatch_output_tokens``) unless the user
    set ``output_tokens_per_row`` (a keyword, or ``config=`` with a non-default value)."""
    expected = getattr(fn, "dfbatch_output_tokens", None)
    user_set = "output_tokens_per_row" in settings or (
        config is not None and config.output_tokens_per_row != _DEFAULT_OUTPUT)
    if isinstance(expected, int) and not isinstance(expected, bool) and not user_set:
        return cfg.replace(output_tokens_per_row=expected)
    return cfg


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
            strings = [n for n, t in schema.items() if t == pl.String] or list(schema) or ["doc"]
            msg = (f"text column {text!r} not found in {list(schema)}.{did_you_mean(text, schema)}"
                   f" Pass text= the column holding the text, e.g. text={strings[0]!r}")
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
    costs = n_tokens.to_numpy().astype(np.int64)
    costs += cfg.output_tokens_per_row  # (in place: one array of a million rows, not two)
    batch = pack(costs, cfg.items_per_batch, limit)
    weights = _batch_weights(batch, costs, cfg)
    agent = balance(weights, cfg.n_agents)[batch] if len(batch) else np.zeros(0, np.uint16)
    cols = cfg.columns
    flag = (
        pl.when(pl.lit(texts.fill_null("") == ""))
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
    if not len(batch):
        return cfg.request_weight + cfg.request_overhead_tokens + np.zeros(0)
    n = int(batch.max()) + 1
    tokens = np.zeros(n)
    step = 1 << 16  # a block at a time: no float and index copies of the whole plan
    for lo in range(0, len(batch), step):  # (integer sums: exact in float64, as in one go)
        tokens += np.bincount(batch[lo:lo + step], weights=costs[lo:lo + step], minlength=n)
    return cfg.request_weight + cfg.request_overhead_tokens + tokens
