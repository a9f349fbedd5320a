"""List prices of a few models, USD per 1,000 tokens (input, output), for cost estimates.

``summary(fn=chat("gpt-4o-mini"))`` uses them when no ``price_in_per_1k`` /
``price_out_per_1k`` is given. Prices change: pass your own for anything that matters. A model
not listed (and the simulator's ``sim-chat``) has no price, and the estimate says so.

Examples
--------
>>> from dfbatch.llm import prices
>>> prices.of("gpt-4o-mini")
(0.00015, 0.0006)
>>> prices.of("my-local-model") is None
True
"""

from __future__ import annotations

PER_1K: dict[str, tuple[float, float]] = {  # OpenAI list prices, 2025 (input, output)
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1-nano": (0.0001, 0.0004),
    "gpt-4.1": (0.002, 0.008),
    "text-embedding-3-small": (0.00002, 0.0),
    "text-embedding-3-large": (0.00013, 0.0),
}


def of(model: str) -> tuple[float, float] | None:
    """``(input, output)`` USD per 1,000 tokens for ``model``, or ``None`` when not listed."""
    return PER_1K.get(model)
