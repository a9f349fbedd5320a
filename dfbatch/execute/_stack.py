"""The limit stack of one run, built once from the config and handed to every pool of the run.

A ``BatchConfig`` is configuration; ``RunLimits.from_config(cfg, n_agents)`` is the per-run state
(aiometer's ``new_state()``): the global in-flight cap, the adaptive (AIMD) limit, the RPM / TPM
buckets, the global pause on 429s (``PauseGate``, last), the circuit breaker, a warm-up cap (a
handful of sends until the first answer, so a bad key costs few calls), the per-agent
concurrency slots and bytes in flight, the dynamic batch sizer and recent latencies. A streamed
run builds it once and passes it to each chunk's pool, so the agents and their limits carry over
from chunk to chunk.

Two ways to charge a call: a plain ``fn`` acquires ``shared`` (every limit) once per call; an fn
that charges its own HTTP requests (``dfbatch.limits.request``) acquires ``calls`` (in-flight,
adaptive) per call and ``per_request`` (warm-up, RPM, TPM, pause) per request.

With no ``rpm`` / ``tpm`` configured the buckets start unknown (``RateLimit(None)``) and adopt
the limits the provider states in its ``x-ratelimit-limit-*`` headers (``Outcome.hints``).

Examples
--------
>>> from dfbatch import BatchConfig
>>> limits = RunLimits.from_config(BatchConfig(rpm=600), n_agents=2)
>>> len(limits.agent_slots), limits.rpm.per_minute, limits.tpm.known
(2, 600.0, False)
>>> type(limits.shared.limits[-1]).__name__
'PauseGate'
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dfbatch.config import BatchConfig
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._hedge import TailState
from dfbatch.execute._limits import (
    AdaptiveLimit,
    CapacityLimit,
    Cost,
    Limit,
    Limits,
    Outcome,
)
from dfbatch.execute._pause import PauseGate
from dfbatch.execute._rate import RateLimit
from dfbatch.execute._sizing import BatchSizer


class WarmUp:
    """At most ``capacity`` sends in flight until the first one is answered (or for
    ``open_after_s``: an error like a refused key comes back far sooner than an answer), then
    no limit: a run whose every call fails (a bad key) stops after a handful of calls, not N.
    Once warm it leaves the stacks it was put in (``leave_when_warm``): it costs them nothing.

    ``ramp_s``: with ``open_after_s``, the cap doubles every ``ramp_s`` without an answer
    (8, 16, 32 ... sends), so a short run does not sit at a quarter of its concurrency for a
    whole second, while an error that comes back within ``ramp_s`` still costs ``capacity``
    sends at most.

    ``slow``: (limits unknown) after the first answer, one more send in flight per answer
    (doubling per round trip, a TCP slow start; halved by a rate-limit 429) until
    ``maximum``, so an unknown per-second limit is not flooded while its rate is learned.
    """

    def __init__(self, capacity: int, *, slow: bool = False, maximum: float = 0.0,
                 open_after_s: float | None = None, ramp_s: float | None = None) -> None:
        self.slots: CapacityLimit | None = CapacityLimit(max(1, capacity))
        self.slow, self.maximum, self.open_after_s = slow, maximum, open_after_s
        self.ramp_s = ramp_s if ramp_s is not None and open_after_s is not None and \
            0 < ramp_s < open_after_s else None
        self._timer: asyncio.TimerHandle | None = None
        self._left_s = 0.0  # (ramping: seconds from the next doubling to the opening)
        self._stacks: list[Limits] = []  # left once warm (see ``leave_when_warm``)

    def leave_when_warm(self, stack: Limits) -> WarmUp:
        """Once warm, drop out of ``stack``: a warm limit holds nothing, and costs nothing."""
        self._stacks.append(stack)
        return self

    def try_acquire(self, cost: Cost) -> bool:
        slots = self.slots
        if slots is None:
            return True
        if self.open_after_s is not None and self._timer is None:
            return False  # (the first send arms the timer in acquire)
        return slots.try_acquire(_ONE)

    async def acquire(self, cost: Cost) -> None:
        slots = self.slots
        if slots is not None:
            if self.open_after_s is not None and self._timer is None:
                loop = asyncio.get_running_loop()
                if self.ramp_s is None:
                    self._timer = loop.call_later(self.open_after_s, self._open)
                else:
                    self._left_s = self.open_after_s - self.ramp_s
                    self._timer = loop.call_later(self.ramp_s, self._double)
            await slots.acquire(_ONE)
            if self.slots is not slots:  # warmed up while this send waited
                slots.release(_ONE)

    def release(self, cost: Cost, outcome: Outcome | None = None) -> None:
        slots = self.slots  # (None once warm: a send taken before that was released with it)
        if slots is None:
            return
        slots.release(_ONE)
        if outcome is None:
            return
        if self.slow and outcome.rate_limited:
            slots.set_capacity(max(1.0, slots.capacity // 2))
        elif outcome.ok and self.slow and slots.capacity + 1 < self.maximum:
            slots.set_capacity(slots.capacity + 1)
        elif outcome.ok:
            self._open()  # the service answers: no more warm-up

    def _double(self) -> None:
        """Ramping: no answer yet after another ``ramp_s``; twice the sends, or open."""
        slots, ramp = self.slots, self.ramp_s
        if slots is None or ramp is None:
            return
        if self._left_s <= 1e-9:
            self._open()
            return
        step = min(ramp, self._left_s)
        self._left_s -= step
        self._timer = asyncio.get_running_loop().call_later(step, self._double)
        slots.set_capacity(2 * slots.capacity)

    def _open(self) -> None:
        slots, self.slots = self.slots, None
        if self._timer is not None:
            self._timer.cancel()  # (kept, not None: the warm-up is not armed again)
        if slots is not None:
            slots.set_capacity(math.inf)
            for stack in self._stacks:
                stack.drop(self)

    def close(self) -> None:
        """Cancel the timer (warm, or the run is over: it must not fire after the run)."""
        if self._timer is not None:
            self._timer.cancel()

    @property
    def warm(self) -> bool:
        return self.slots is None


_ONE = Cost(tokens=0, nbytes=0)


@dataclass(eq=False)
class RunLimits:
    """Every limit of one run (see the module docstring)."""

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
    tail: TailState = field(default_factory=TailState)  # latency model + hedge budget
    calls: Limits = field(default_factory=lambda: Limits([]))
    per_request: Limits = field(default_factory=lambda: Limits([]))
    pause: PauseGate | None = None
    breaker: Breaker | None = None
    # the pools running on these limits (a streamed run's chunks overlap): the slot a worker
    # gives up for good wakes the others, whose workers keep theirs and so never look again
    pools: list[Callable[[], None]] = field(default_factory=list)
    warm_ups: tuple[WarmUp, ...] = ()  # (their timers: ``close``)

    @classmethod
    def from_config(cls, cfg: BatchConfig, n_agents: int, *, rates_elsewhere: bool = False
                    ) -> RunLimits:
        """The stack ``cfg`` asks for. ``rates_elsewhere``: RPM / TPM are enforced outside this
        process (the Ray engine's limiter actor): no local buckets, but AIMD knows rates pace."""
        global_slots = CapacityLimit(cfg.in_flight_cap)
        adaptive = AdaptiveLimit(cfg.in_flight_cap) if cfg.adaptive else None
        burst = cfg.rate_burst
        local = not rates_elsewhere
        told = bool(cfg.rpm or cfg.tpm)
        per_call: list[Limit] = [global_slots, *([adaptive] if adaptive is not None else [])]
        per_request: list[Limit] = []
        rpm = tpm = pause = None
        # (under Ray only its stall clock runs here, fed by the actors: outage_timeout)
        breaker = Breaker(give_up_s=cfg.outage_timeout)
        if local:
            rpm = RateLimit(cfg.rpm or None, burst=burst)
            tpm = RateLimit(cfg.tpm or None, tokens=True, burst=burst)
            pause = PauseGate(breaker=breaker)
            # a plain fn sends one request per call (its 429s meet the adaptive concurrency);
            # an fn charging per request gets, while the limits are unknown, a slow start of
            # its requests (its calls' concurrency says little about its requests')
            rpm.pause = tpm.pause = pause
            rates: list[Limit] = [rpm, tpm, pause]
            warm_up = WarmUp(2 * n_agents, open_after_s=1.0, ramp_s=0.25)
            per_call = [*per_call, warm_up, *rates]
            slow = WarmUp(2 * n_agents, slow=not told, maximum=cfg.in_flight_cap,
                          open_after_s=1.0 if told else None, ramp_s=0.25)
            per_request = [slow, *rates]
        if adaptive is not None:
            adaptive.rate_known = told
        sizer = (
            BatchSizer(cfg.items_per_batch, max_items=max(6, cfg.items_per_batch),
                       target_latency_s=cfg.target_latency_s)
            if cfg.dynamic_batching else None
        )
        calls = per_call[:2] if adaptive is not None else per_call[:1]
        shared, requests = Limits(per_call), Limits(per_request)
        if local:
            warm_up.leave_when_warm(shared)
            slow.leave_when_warm(requests)
        return cls(
            shared=shared,
            agent_slots=[CapacityLimit(cfg.max_concurrent_batches) for _ in range(n_agents)],
            agent_bytes=[CapacityLimit(cfg.max_bytes_per_agent, _nbytes)
                         for _ in range(n_agents)],
            adaptive=adaptive, rpm=rpm, tpm=tpm, sizer=sizer, burst=burst,
            learns=local, calls=Limits(calls), per_request=requests, pause=pause,
            breaker=breaker, warm_ups=(warm_up, slow) if local else (),
        )

    def close(self) -> None:
        """The run is over (its owner says so: the run, or a pool that built these limits):
        cancel the timers the limits armed on the loop (the warm-ups' opening, the breaker's
        stall clock), so none fires after the run. Idempotent."""
        for warm_up in self.warm_ups:
            warm_up.close()
        if self.pause is not None:
            self.pause.close()
        if self.breaker is not None:
            self.breaker.close()

    def rate_bound(self) -> bool:
        """Is the request rate the binding limit (so fewer, larger requests finish sooner)?"""
        if self.rpm is None or self.rpm.recent_wait < 1e-3:
            return False
        return self.tpm is None or self.rpm.recent_wait > 2 * self.tpm.recent_wait

    def learned(self) -> None:
        """After an outcome reached the limits: AIMD on concurrency stays off for rate-limit
        429s once a stated limit paces (configured, or from ``x-ratelimit-limit-*``)."""
        if self.adaptive is not None and self.learns:
            self.adaptive.rate_known = any(r is not None and r.per_minute > 0
                                           for r in (self.rpm, self.tpm))


def _nbytes(cost: Cost) -> float:
    return cost.nbytes
