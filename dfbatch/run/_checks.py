"""Pre-flight checks: what would fail (or cost) after the first call is refused before it.

``check_frame`` runs once per run, before planning and before ``fn`` is called:

- **Name clashes.** A column of the input named like a column the result adds (``output``,
  ``error``, ``attempts``, ``run_batch_id``, ``run_agent_id``, ``started_at``, ``elapsed_s``,
  or their ``columns=`` renames) would be overwritten or break the assembly after every row was
  paid for. The error lists every clash and the fix (``columns={...}`` or dropping them).
- **Plan columns.** A frame that carries a plan (``n_tokens``, ``batch_id``, ``agent_id``,
  ``plan_flag``) runs as planned, so its plan is validated: integer types, no nulls, no
  negative values, agent ids that fit the run (a forged ``agent_id=60000`` on two rows would
  start 60001 agents).

- **A rate too small for one request.** With ``tpm=`` below the tokens of the smallest request
  the plan sends (a row's text plus ``output_tokens_per_row`` for an adapter that sends a request
  per row, a batch's tokens for one that sends one per batch), no request could ever fit the
  run's own token budget: ``check_rates`` refuses the run and names ``tpm=``.

Examples
--------
>>> import polars as pl
>>> from dfbatch.config import BatchConfig
>>> check_frame(pl.DataFrame({"text": ["a"], "error": [None]}), BatchConfig())
Traceback (most recent call last):
...
dfbatch.errors.ColumnError: the input already has column(s) ['error'] that the result adds; ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import ColumnError, ConfigError
from dfbatch.execute._charge import charges_per_request, one_request_per_call
from dfbatch.execute._scheduler import Batch, Batches

_MAX_AGENT_ID = 65_534  # agent ids are UInt16


def check_frame(df: pl.DataFrame, cfg: BatchConfig) -> None:
    """Refuse an input whose columns clash with the result's, or whose plan is damaged."""
    c = cfg.columns
    adds = (c.output, *c.result_names())
    clash = [name for name in adds if name in df.columns]
    if clash:
        field = {getattr(c, f): f for f in c.__dataclass_fields__}
        fix = ", ".join(f"{field[n]!r}: '{n}_2'" for n in clash)
        msg = (f"the input already has column(s) {clash} that the result adds; rename the "
               f"result's columns with columns={{{fix}}} (dfbatch.Columns), or drop them from "
               "the input (e.g. df.drop(...)) if this frame is an earlier result")
        raise ColumnError(msg)
    plan = c.plan_names()
    if all(name in df.columns for name in plan):
        _check_plan(df, cfg)


def _check_plan(df: pl.DataFrame, cfg: BatchConfig) -> None:
    c = cfg.columns
    for name in (c.n_tokens, c.batch_id, c.agent_id):
        col = df[name]
        problem = None
        if not col.dtype.is_integer():
            problem = f"has type {col.dtype}, not an integer type"
        elif col.null_count():
            problem = f"has {col.null_count()} null value(s)"
        elif df.height and col.min() < 0:  # type: ignore[operator]
            problem = f"has negative values (e.g. {col.min()!r})"
        if problem is not None:
            msg = (f"plan column {name!r} {problem}: the frame's plan is damaged. Re-plan it "
                   f"(df.drop({list(c.plan_names())}).batch.plan(...)), or drop the plan "
                   "columns and let process() plan")
            raise ColumnError(msg)
    if not df.height:
        return
    top = int(df[c.agent_id].max())  # type: ignore[arg-type]
    n_batches = df[c.batch_id].n_unique()
    if top > _MAX_AGENT_ID or top >= max(cfg.n_agents, n_batches):
        msg = (f"plan column {c.agent_id!r} has agent id {top}, but the run has "
               f"{cfg.n_agents} agents and the plan {n_batches} batch(es): the plan is damaged "
               "or made for another run. Re-plan it (df.batch.plan(...)), or pass "
               f"agents={top + 1} if you really mean that many agents")
        raise ColumnError(msg)


def check_rates(fn: Any, cfg: BatchConfig, row_tokens: np.ndarray,
                batches: Batches | Sequence[Sequence[Batch]]) -> None:
    """Refuse ``tpm=`` below the smallest request an fn that charges each request would send.

    >>> import numpy as np
    >>> from dfbatch.execute._charge import per_request
    >>> async def fn(batch): ...
    >>> check_rates(per_request(fn), BatchConfig(tpm=10, output_tokens_per_row=16),
    ...             np.array([5, 7]), [])
    Traceback (most recent call last):
    ...
    dfbatch.errors.ConfigError: tpm=10 is smaller than the smallest request this run sends ...
    """
    if cfg.tpm is None or not charges_per_request(fn) or not len(row_tokens):
        return
    if one_request_per_call(fn):
        sizes = Batches.of(batches).tokens
        if not len(sizes):
            return
        smallest = int(sizes.min())
    else:
        smallest = int(np.min(row_tokens)) + cfg.output_tokens_per_row
    if cfg.tpm < smallest:
        msg = (f"tpm={cfg.tpm:g} is smaller than the smallest request this run sends "
               f"(~{smallest} tokens, output cap included): no request could ever fit. Raise "
               f"tpm= to at least {smallest} (your provider's tokens-per-minute limit), or "
               "lower the adapter's max_tokens")
        raise ConfigError(msg)
