"""The limit stack of one run, built once from the config and handed to every pool of the run.

A ``BatchConfig`` is configuration; ``RunLimits.from_config(cfg, n_agents)`` is the per-run state
(aiometer's ``new_state()``): the global in-flight cap, the adaptive (AIMD) limit, the RPM / TPM
buckets, the per-agent concurrency slots and bytes in flight, the dynamic batch sizer and recent
latencies. A streamed run builds it once and passes it to each chunk's pool, so the agents and
their limits carry over from chunk to chunk.

Examples
--------
>>> from dfbatch import BatchConfig
>>> limits = RunLimits.from_config(BatchConfig(rpm=600), n_agents=2)
>>> len(limits.agent_slots), limits.rpm.per_minute, limits.tpm is None
(2, 600.0, True)
>>> limits.learn({"x-ratelimit-limit-tokens": "9000"}); limits.tpm.per_minute
9000.0
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dfbatch.config import BatchConfig
from dfbatch.execute._limits import AdaptiveLimit, CapacityLimit, Cost, Limit, Limits, RateLimit
from dfbatch.execute._sizing import BatchSizer


@dataclass(eq=False)
class RunLimits:
    """Every limit of one run; ``shared`` is the stack each call acquires (global ones)."""

    shared: Limits
    agent_slots: list[CapacityLimit]
    agent_bytes: list[CapacityLimit]
    adaptive: AdaptiveLimit | None = None
    rpm: RateLimit | None = None
    tpm: RateLimit | None = None
    sizer: BatchSizer | None = None
    burst: float = 0.1
    learns: bool = True  # adopt x-ratelimit-limit-* headers when no rpm / tpm is configured
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    _per_agent: dict[int, Limits] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: BatchConfig, n_agents: int, *, rates_elsewhere: bool = False
                    ) -> RunLimits:
        """The stack ``cfg`` asks for. ``rates_elsewhere``: RPM / TPM are enforced outside this
        process (the Ray engine's limiter actor): no local buckets, but AIMD knows rates pace."""
        global_slots = CapacityLimit(cfg.in_flight_cap)
        adaptive = AdaptiveLimit(cfg.in_flight_cap) if cfg.adaptive else None
        burst = cfg.rate_burst
        local = not rates_elsewhere
        rpm = RateLimit(cfg.rpm, burst=burst) if cfg.rpm and local else None
        tpm = RateLimit(cfg.tpm, tokens=True, burst=burst) if cfg.tpm and local else None
        if adaptive is not None:
            adaptive.rate_known = bool(cfg.rpm or cfg.tpm)
        stack: list[Limit] = [global_slots]
        stack += [x for x in (adaptive, rpm, tpm) if x is not None]
        sizer = (
            BatchSizer(cfg.items_per_batch, max_items=max(6, cfg.items_per_batch),
                       target_latency_s=cfg.target_latency_s)
            if cfg.dynamic_batching else None
        )
        return cls(
            shared=Limits(stack),
            agent_slots=[CapacityLimit(cfg.max_concurrent_batches) for _ in range(n_agents)],
            agent_bytes=[CapacityLimit(cfg.max_bytes_per_agent, _nbytes)
                         for _ in range(n_agents)],
            adaptive=adaptive, rpm=rpm, tpm=tpm, sizer=sizer, burst=burst,
            learns=local,
        )

    def for_agent(self, a: int) -> Limits:
        """What one call of agent ``a`` holds: its bytes in flight, then the shared stack."""
        stack = self._per_agent.get(a)
        if stack is None:
            stack = self._per_agent[a] = Limits([self.agent_bytes[a], *self.shared.limits])
        return stack

    def rate_bound(self) -> bool:
        """Is the request rate the binding limit (so fewer, larger requests finish sooner)?"""
        if self.rpm is None or self.rpm.recent_wait < 1e-3:
            return False
        return self.tpm is None or self.rpm.recent_wait > 2 * self.tpm.recent_wait

    def learn(self, headers: dict[str, str]) -> None:
        """Adopt the provider's x-ratelimit-limit-* when the user configured no rpm / tpm."""
        if not self.learns:
            return
        lower = {k.lower(): v for k, v in headers.items()}
        for key, tokens in (("x-ratelimit-limit-requests", False),
                            ("x-ratelimit-limit-tokens", True)):
            if (self.tpm if tokens else self.rpm) is not None or key not in lower:
                continue
            try:
                per_minute = float(lower[key])
            except ValueError:
                continue
            if per_minute > 0:
                limit = RateLimit(per_minute, tokens=tokens, burst=self.burst)
                if tokens:
                    self.tpm = limit
                else:
                    self.rpm = limit
                self.shared.add(limit)
                self._per_agent.clear()  # the agents' stacks take it from their next call

    def sync(self, headers: dict[str, str], cost: Cost) -> None:
        """``x-ratelimit-remaining-*`` says how full the provider's buckets really are."""
        lower = {k.lower(): v for k, v in headers.items()}
        for key, limit in (("x-ratelimit-remaining-requests", self.rpm),
                           ("x-ratelimit-remaining-tokens", self.tpm)):
            if limit is None or key not in lower:
                continue
            try:
                remaining = float(lower[key])
            except ValueError:
                continue
            limit.sync(remaining, cost)
        if self.adaptive is not None and self.learns:
            self.adaptive.rate_known = self.rpm is not None or self.tpm is not None


def _nbytes(cost: Cost) -> float:
    return cost.nbytes
