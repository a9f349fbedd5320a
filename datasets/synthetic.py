"""Synthetic workloads with controlled token-length distributions, for benchmarks and tests.

Texts are made of common English words that are each exactly one token in ``cl100k_base`` and
``o200k_base`` (with or without a leading space), so a row's token count is exactly its
``target_tokens``. Same arguments and seed, same frame.

Distributions (``dist``):

- ``"lognormal"``: long-tailed around ``mean_tokens`` (``sigma`` sets the tail), like real docs.
- ``"uniform"``: every length in ``[low, high]`` equally likely.
- ``"skewed"``: mostly short rows (exponential, mean ``mean_tokens``) plus ``oversize_fraction``
  (default 1%) of rows of ``oversize_tokens`` - larger than a batch's token limit.
- ``"constant"``: every row ``mean_tokens`` long.

``oversize_fraction`` applies to any distribution. Lengths are clipped to ``[low, high]``
except oversize rows.

Examples
--------
>>> df = generate(1000, dist="skewed", mean_tokens=50, oversize_tokens=40_000, seed=1)
>>> df.columns, df.height, int((df["target_tokens"] == 40_000).sum())
(['id', 'text', 'target_tokens'], 1000, 10)
>>> generate(3, dist="constant", mean_tokens=4, seed=0)["text"].to_list()
['agent read pack error', 'may disk new check', 'read that with data']
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl

Dist = Literal["lognormal", "uniform", "skewed", "constant"]

# Each is one token in cl100k_base and o200k_base, alone or after a space (checked in tests).
WORDS = (
    "the of and to in is for on that with as by it at from this be are or an was not but have "
    "which can all one has more their will its also new data time used use these first other "
    "into two than may been only such each over most some when would make many any they about "
    "there after value list file class type method return number string object function table "
    "model batch token agent rate limit request queue worker error result input output frame "
    "column row index text call retry window cache store load query record event state field "
    "name path line page user group order price cost report system server client thread "
    "process memory disk network stream buffer block chunk split merge sort filter join scan "
    "write read open close start stop wait send receive parse format check build test run plan "
    "pack score"
).split()


def lengths(
    n: int,
    *,
    dist: Dist = "lognormal",
    mean_tokens: float = 200.0,
    sigma: float = 1.0,
    low: int = 1,
    high: int = 8000,
    oversize_fraction: float | None = None,
    oversize_tokens: int = 40_000,
    seed: int = 0,
) -> np.ndarray:
    """Token lengths (int64) of ``n`` rows drawn from ``dist`` (see the module docstring)."""
    if n < 0 or not 1 <= low <= high or mean_tokens <= 0:
        msg = f"need n >= 0, 1 <= low <= high and mean_tokens > 0; got {n}, {low}, {high}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    if dist == "lognormal":
        mu = np.log(mean_tokens) - sigma**2 / 2  # so that the mean is mean_tokens
        raw = rng.lognormal(mu, sigma, n)
    elif dist == "uniform":
        raw = rng.integers(low, high + 1, n).astype(float)
    elif dist == "skewed":
        raw = rng.exponential(mean_tokens, n)
    elif dist == "constant":
        raw = np.full(n, float(mean_tokens))
    else:
        msg = f"dist must be 'lognormal', 'uniform', 'skewed' or 'constant', got {dist!r}"
        raise ValueError(msg)
    out = np.clip(np.rint(raw), low, high).astype(np.int64)
    frac = (0.01 if dist == "skewed" else 0.0) if oversize_fraction is None else oversize_fraction
    k = round(frac * n)
    if k:
        out[rng.choice(n, size=k, replace=False)] = oversize_tokens
    return out


def generate(
    n: int = 10_000,
    *,
    dist: Dist = "lognormal",
    mean_tokens: float = 200.0,
    sigma: float = 1.0,
    low: int = 1,
    high: int = 8000,
    oversize_fraction: float | None = None,
    oversize_tokens: int = 40_000,
    seed: int = 0,
) -> pl.DataFrame:
    """``n`` rows: ``id``, ``text`` (exactly ``target_tokens`` tokens) and ``target_tokens``."""
    sizes = lengths(
        n,
        dist=dist,
        mean_tokens=mean_tokens,
        sigma=sigma,
        low=low,
        high=high,
        oversize_fraction=oversize_fraction,
        oversize_tokens=oversize_tokens,
        seed=seed,
    )
    rng = np.random.default_rng([seed, 1])
    vocab = pl.Series(WORDS, dtype=pl.String)
    words = vocab.gather(rng.integers(0, len(WORDS), int(sizes.sum())))
    rows = pl.Series(np.repeat(np.arange(n, dtype=np.int64), sizes))
    texts = (
        pl.DataFrame({"id": rows, "w": words})
        .group_by("id", maintain_order=True)
        .agg(pl.col("w").str.join(" ").alias("text"))
    )
    base = pl.DataFrame(
        {"id": np.arange(n, dtype=np.int64), "target_tokens": pl.Series(sizes, dtype=pl.UInt32)}
    )
    return base.join(texts, on="id", how="left").select("id", "text", "target_tokens")
