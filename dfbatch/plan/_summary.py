"""``summary``: what a planned frame will send — sizes, flagged rows, agent loads and cost.

The cost estimate prices what ``process`` sends. With ``fn=`` an adapter (``dfbatch.llm.chat``)
that carries ``dfbatch_tokens`` counts each batch's requests as the run charges them: the
rendered prompt template, the system message, the chat framing, and the output cap
(``max_tokens``) per row. Without one, input is text tokens + ``request_overhead_tokens`` per
request and output is ``output_tokens_per_row`` per row. ``null_text`` rows are not sent (unless
``send_null=True``). A missing price is said, never printed as $0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import ColumnError, ConfigError
from dfbatch.plan._balance import balance_ratio
from dfbatch.plan._plan import NULL_TEXT, OVERSIZE, with_fn


@dataclass(frozen=True, repr=False, eq=False)
class PlanSummary:
    """What a plan will send: sizes, flagged rows, per-agent load, balance and estimated cost.

    ``tokens_in`` / ``tokens_out`` are the estimated input and output tokens of the requests
    (output at its cap); ``cost_in`` / ``cost_out`` are ``None`` when that price is missing.
    """

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
    tokens_in: int = 0
    tokens_out: int = 0
    basis: str = "texts, overhead, output_tokens_per_row"
    batch_discount: float | None = None  # the Batch API's price / the synchronous price
    cached: int = 0  # rows the response cache answers: not counted above, not priced

    @property
    def flagged(self) -> int:
        return self.null_text + self.oversize

    @property
    def cost(self) -> float | None:
        """Total estimated USD, ``None`` unless both prices are known."""
        if self.cost_in is None or self.cost_out is None:
            return None
        return self.cost_in + self.cost_out

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
            f"est. sent: {self.tokens_in:,} input + {self._cap}{self.tokens_out:,} output tokens "
            f"({self.basis})",
        ]
        lines.append(self._cost_line())
        if self.cost is not None and self.batch_discount is not None:
            batch = self.cost * self.batch_discount
            lines.append(
                f"batch API: {self._cap}${batch:,.4f} vs {self._cap}${self.cost:,.4f} "
                f"synchronous (saves {self._cap}${self.cost - batch:,.4f}, "
                f"{1 - self.batch_discount:.0%})"
            )
        if self.cached:
            lines.append(f"cached: {self.cached:,} more rows answered by the cache (not sent)")
        return "\n".join(lines)

    def _cost_line(self) -> str:
        if self.cost_in is None and self.cost_out is None:
            return "est. cost: no price; pass price_in_per_1k= and price_out_per_1k="
        if self.cost is None:
            known = "input" if self.cost_in is not None else "output"
            missing = "price_out_per_1k=" if self.cost_in is not None else "price_in_per_1k="
            return (f"est. cost: ${self.cost_in or self.cost_out or 0:,.4f} for {known} only; "
                    f"pass {missing} for the rest")
        return (f"est. cost: {self._cap}${self.cost:,.4f} (input ${self.cost_in:,.4f}, output "
                f"{self._cap}${self.cost_out:,.4f})")

    @property
    def _cap(self) -> str:
        """Output counted at its cap (an adapter's max_tokens): the cost is an upper bound."""
        return "up to " if self.basis.startswith("fn") else ""

    __repr__ = __str__


def summary(
    planned: pl.DataFrame,
    *,
    fn: Any = None,
    price_in_per_1k: float | None = None,
    price_out_per_1k: float | None = None,
    config: BatchConfig | None = None,
    batch_discount: float | None = None,
    cached: Any = None,
    **kwargs: Any,
) -> PlanSummary:
    """Summarize a planned frame: rows, batches, tokens, flagged rows, agent loads and cost.

    Pass the ``config`` / settings used to plan (overhead, output tokens, agents) for exact
    request tokens and loads, and ``fn=`` the function you will process with to price what it
    sends (see the module doc). Prices default to ``fn``'s model list price
    (``dfbatch.llm.prices``) when it has one. ``null_text`` rows are not counted (they are not
    sent); an oversize row counts in full. ``batch_discount`` (0.5 for OpenAI's Batch API) adds
    the price of the same requests sent as batch jobs beside it. ``cached`` (a boolean mask, one
    per row; ``df.batch.summary(fn=..., cache=...)`` computes it) leaves out the rows the
    response cache answers: they are counted in ``cached`` and priced at nothing.

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
    est. sent: 12 input + 0 output tokens (texts, overhead, output_tokens_per_row)
    est. cost: $0.0060 for input only; pass price_out_per_1k= for the rest
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
    cfg = with_fn(BatchConfig.from_kwargs(config, **kwargs), fn, config, kwargs)
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
    w = per_batch["load"].to_numpy()
    tokens_in, tokens_out, basis = _sent_tokens(planned, per_batch, cfg, fn)
    price = getattr(fn, "dfbatch_price", None)
    if isinstance(price, tuple) and len(price) == 2:
        price_in_per_1k = price[0] if price_in_per_1k is None else price_in_per_1k
        price_out_per_1k = price[1] if price_out_per_1k is None else price_out_per_1k
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
        loads=_agent_loads(per_batch, n_agents),
        balance_ratio=balance_ratio(w, per_batch["agent_id"].to_numpy(), n_agents),
        lower_bound=float(max(w.sum() / n_agents, w.max())) if len(w) else 0.0,
        cost_in=None if price_in_per_1k is None else tokens_in / 1000 * price_in_per_1k,
        cost_out=None if price_out_per_1k is None else tokens_out / 1000 * price_out_per_1k,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        basis=basis,
        batch_discount=_discount(batch_discount),
        cached=n_cached,
    )


def _discount(value: float | None) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
        msg = f"batch_discount must be in (0, 1] (0.5 = the Batch API's half price), got {value!r}"
        raise ConfigError(msg)
    return value


def _sent_tokens(
    planned: pl.DataFrame, per_batch: pl.DataFrame, cfg: BatchConfig, fn: Any
) -> tuple[int, int, str]:
    """Input and output tokens of the requests ``process`` will send, and how they were found."""
    cols = cfg.columns
    sent = planned if cfg.send_null else planned.filter(
        pl.col(cols.flag).fill_null("") != NULL_TEXT)
    count = getattr(fn, "dfbatch_tokens", None)
    if callable(count):
        tokens_in = tokens_out = 0
        for batch in sent.partition_by(cols.batch_id, maintain_order=True):
            i, o = count(batch)
            tokens_in, tokens_out = tokens_in + int(i), tokens_out + int(o)
        return tokens_in, tokens_out, "fn's prompt, system message and max_tokens"
    rows = "rows" if cfg.send_null else "sent_rows"
    tokens = "tokens" if cfg.send_null else "sent_tokens"
    tokens_in = int(per_batch[tokens].sum()) + cfg.request_overhead_tokens * int(
        (per_batch[rows] > 0).sum())
    tokens_out = cfg.output_tokens_per_row * int(per_batch[rows].sum())
    return tokens_in, tokens_out, "texts, overhead, output_tokens_per_row"
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
