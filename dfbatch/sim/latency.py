"""Seeded latency and fault draws of the simulated endpoint.

Latency = ttft + per-input-token x prompt tokens + per-token x completion tokens, and with
probability ``tail_prob`` multiplied by a Pareto(1.5) factor of at least ``tail_factor`` (capped
at ``tail_cap``) — the heavy tail real APIs have. Everything is returned in *real* seconds
(multiplied by ``time_scale``). Draws come from one ``random.Random(seed)``, in arrival order.

Examples
--------
>>> from dfbatch.sim import SimConfig
>>> from dfbatch.sim.latency import Dice
>>> dice = Dice(SimConfig(ttft_s=0.5, per_token_s=0.01, tail_prob=0.0, time_scale=0.1))
>>> round(dice.chat_latency(prompt_tokens=100, completion_tokens=50), 6)
0.1
>>> dice = Dice(SimConfig(error_rate=0.5, seed=1))
>>> {dice.fault() for _ in range(200)} == {'error', None}
True
"""

from __future__ import annotations

import random
from typing import Literal

from dfbatch.sim.config import SimConfig

Fault = Literal["error", "hang", "reset"] | None


class Dice:
    """The endpoint's source of randomness: latencies and injected faults."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)

    def _tail(self) -> float:
        c = self.config
        if c.tail_prob and self.rng.random() < c.tail_prob:
            return min(c.tail_cap, c.tail_factor * self.rng.paretovariate(1.5))
        return 1.0

    def chat_latency(self, prompt_tokens: int, completion_tokens: int) -> float:
        c = self.config
        base = c.ttft_s + c.per_input_token_s * prompt_tokens + c.per_token_s * completion_tokens
        return base * self._tail() * c.time_scale

    def embed_latency(self, tokens: int) -> float:
        c = self.config
        return (c.embed_latency_s + c.per_input_token_s * tokens) * self._tail() * c.time_scale

    def fault(self) -> Fault:
        """One draw: ``"error"`` (HTTP 500), ``"hang"``, ``"reset"`` or None (serve normally)."""
        c = self.config
        u = self.rng.random()
        for kind, rate in (("error", c.error_rate), ("hang", c.hang_rate), ("reset", c.reset_rate)):
            if u < rate:
                return kind  # type: ignore[return-value]
            u -= rate
        return None
