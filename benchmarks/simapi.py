"""An in-process simulated rate-limited LLM API, and a virtual clock to run it fast.

No HTTP: a call is ``await api.call(row_ids)``. Every runner in ``pool_bench.py`` (dfbatch and
the hand-written baselines) talks to the same ``SimAPI`` and sees the same rules.

The server
----------
A request for rows ``ids`` is charged ``overhead_tokens + sum(row tokens) +
output_tokens_per_row * len(ids)`` tokens (providers charge ``max_tokens`` up front). Checks, in
the order a gateway runs them:

1. **Too large**: request tokens > ``max_request_tokens`` (or more than a whole rate bucket)
   -> ``SimError(400)`` after one RTT.
2. **Rate limits**: an RPM and a TPM token bucket, refilled continuously, each holding
   ``burst_s`` seconds of refill (default 60 s = one minute's limit, as OpenAI documents its
   per-minute limits; 1 s = a per-minute limit enforced per second, as OpenAI says it may and
   Azure OpenAI does) and starting full. With ``limit_mode="calendar"`` they are instead fixed
   windows of ``burst_s`` seconds aligned on the clock (a gateway's calendar minute: LiteLLM
   counts per wall minute), the clock reading ``calendar_offset_s`` at the first call. A
   request every limit can pay for is charged at once (a rejected one is not charged);
   otherwise ``SimError(429)`` after one RTT. A request short by less than 1 ms of refill is
   admitted: the server's clock granularity (a client that waits exactly until its own copy
   of the bucket holds enough is not punished for float rounding).

   What the 429 and the replies say depends on ``headers``: ``"openai"`` -- ``retry_after``
   (the true wait) and ``retry-after`` / ``retry-after-ms`` headers, ``x-ratelimit-*`` on
   every reply; ``"none"`` -- nothing at all (no headers, ``retry_after=None``);
   ``"litellm"`` -- per-key ``x-ratelimit-api_key-{limit,remaining}-*`` on replies and a 429
   whose only hint is the header ``llm_provider-retry-after`` = the window's length (``60``
   for a calendar minute), whatever the true wait; ``"ietf"`` -- the IETF draft's
   ``RateLimit-Policy: "requests";q=<capacity>;w=<burst_s>`` and ``RateLimit:
   "requests";r=<remaining>;t=<reset>`` on replies (requests only: the draft has no token
   unit) and a 429 with ``retry-after`` in whole seconds (``retry_after=None``).
0. **Dead or refusing server** (checked first): during ``outage = (start, duration)``
   (seconds since the first call) every call raises ``SimConnectionError`` (a
   ``ConnectionError``, as the OpenAI SDK's ``APIConnectionError`` is to a client) after one
   RTT, and calls being served when it starts fail at its start. With ``bad_key`` every call
   gets ``SimError(401)`` (``code="invalid_api_key"``) after one RTT.
3. **Server concurrency**: ``max_concurrency`` slots. Excess requests *wait* in a FIFO queue
   (like vLLM or a load balancer: latency grows, nothing is rejected), unless ``queue_limit`` is
   set and the queue is full: then ``SimError(429, "server overloaded", retry_after=
   overload_retry_s)``; such a request is not charged.
4. **Faults** (seeded, drawn per call): poison rows (id in ``Workload.poison``) -> ``SimError
   (400)`` every time, after half the latency; ``p_500`` -> ``SimError(500)`` part way through;
   ``p_hang`` -> the call never returns (only a client timeout ends it).
5. **Latency**: ``(base_latency + per_input_token_s * input + per_output_token_s * output) * m``
   where ``m = max(min_multiplier, lognormal(0, sigma))``, multiplied with probability
   ``p_tail`` by a Pareto(``tail_alpha``) factor capped at ``tail_cap`` -- a heavy tail.

``SimError`` carries ``status_code``, ``retry_after`` and ``headers``, which
``dfbatch.execute._retry.classify`` understands
(and the baselines read the same attributes). Successful
replies carry OpenAI-style ``x-ratelimit-*`` headers (``limit``: per minute; ``remaining``: the
bucket's level after this request was charged; ``reset``: time until the bucket is full).

The API counts calls, 429s, 500s, 400s and hangs, logs every call (start and end time, rows,
tokens, outcome) for spies, and counts the rows it *served* (successful replies), so lost and
duplicated rows can be counted.

The clock
---------
``run(coro, clock="virtual")`` runs on ``VirtualClockLoop``: an ordinary selector event loop
whose ``time()`` jumps straight to the next timer whenever nothing is ready. ``asyncio.sleep``,
``wait_for`` timeouts, anyio (aiometer) and dfbatch's limiters all read ``loop.time()``, so a run
that takes 5 minutes of simulated time takes only the CPU time of its callbacks, deterministically.
What the virtual clock does not show is CPU overhead (time stands still while Python runs); the
``"real"`` clock with a ``time_scale`` shows it, and ``overhead_bench.py`` measures it directly.

Examples
--------
>>> wl = Workload.make(8, mean_tokens=100, seed=0, poison_frac=0.0)
>>> api = SimAPI(SimConfig(tpm=1000, base_latency=2.0, sigma=0.0, per_output_token_s=0), wl)
>>> async def two_calls():
...     first = await api.call([0, 1, 2, 3])
...     try:
...         await api.call(list(range(8)))  # more tokens than the bucket holds now
...     except SimError as exc:
...         return len(first.outputs), exc.status_code, exc.retry_after > 0, api.now()
>>> run(two_calls())  # 2 s latency + one RTT of simulated time, no real waiting
(4, 429, True, 2.05)
>>> api.stats.calls, api.stats.n429
(2, 1)
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

T = TypeVar("T")
Clock = Literal["virtual", "real"]
_GRACE_S = 1e-3  # a request short of less than 1 ms of refill is admitted (clock granularity)


# -- the clock -----------------------------------------------------------------------------
class _JumpSelector:
    """Wraps the loop's selector: instead of blocking for ``timeout``, advance virtual time."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        self._loop.tick()  # like a real clock, time moves a little on every loop iteration
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled, nothing ready: only real I/O could wake us
            events = self._real.select(5.0)
            if not events:
                msg = "virtual clock: nothing is scheduled and nothing is ready (a deadlock)"
                raise RuntimeError(msg)
            return events
        self._loop.advance(timeout)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time: ``time()`` jumps to the next timer when idle."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        real: Any = self._selector  # type: ignore[has-type]
        self._selector = _JumpSelector(real, self)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def tick(self) -> None:
        """Move time forward by one representable step (>= 1 ps), as a real clock would.

        Without it, code that sleeps for a rounding error (``sleep((need - level) / rate)``
        with ``level`` a hair short) could spin forever at one instant.
        """
        self._now = max(self._now + 1e-12, math.nextafter(self._now, math.inf))


def run(coro: Coroutine[Any, Any, T], clock: Clock = "virtual") -> T:
    """Run ``coro`` to completion on a fresh loop: simulated (``"virtual"``) or real time."""
    factory = VirtualClockLoop if clock == "virtual" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# -- errors and replies --------------------------------------------------------------------
class SimError(Exception):
    """An HTTP-like error of the simulated API (``status_code``, ``retry_after``, headers)."""

    def __init__(self, status_code: int, message: str, retry_after: float | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.retry_after = retry_after
        self.headers = headers or {}
        self.code = code


class SimConnectionError(ConnectionError):
    """The server is down: the connection was refused or reset (no HTTP status)."""


@dataclass(frozen=True)
class Reply:
    outputs: list[str]
    input_tokens: int
    output_tokens: int
    headers: dict[str, str]


def expected_output(row: int) -> str:
    """What the API answers for row ``row`` (runners are checked against it)."""
    return f"out:{row}"


# -- the workload --------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Rows to process: tokens per row, poison rows (always 400), oversize rows."""

    tokens: np.ndarray
    poison: frozenset[int] = frozenset()

    @property
    def n(self) -> int:
        return len(self.tokens)

    def texts(self) -> list[str]:
        return [f"r{i}" for i in range(self.n)]

    @classmethod
    def make(cls, n: int, *, mean_tokens: float, seed: int, skew: float = 0.0,
             poison_frac: float = 0.0, oversize: Sequence[int] = (), oversize_tokens: int = 0
             ) -> Workload:
        """``n`` rows of about ``mean_tokens`` tokens (lognormal, sigma 0.4) or, with ``skew``
        > 0, Pareto(``1 + 1/skew``) sizes with that mean (capped at 50x); ``poison_frac`` of the
        rows are poison; rows listed in ``oversize`` get ``oversize_tokens`` tokens."""
        rng = np.random.default_rng(seed)
        if skew > 0:
            alpha = 1.0 + 1.0 / skew
            raw = (rng.pareto(alpha, n) + 1.0) * mean_tokens * (alpha - 1) / alpha
            tok = np.minimum(raw, 50 * mean_tokens)
        else:
            tok = rng.lognormal(math.log(mean_tokens) - 0.08, 0.4, n)
        tokens = np.maximum(1, tok.round()).astype(np.int64)
        for i in oversize:
            tokens[i] = oversize_tokens
        k = round(poison_frac * n)
        picked = rng.choice(n, size=k, replace=False).tolist() if k else []
        poison = frozenset(int(i) for i in picked)
        return cls(tokens, poison)


# -- the server ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    """The simulated server. Durations in seconds, limits per minute (see module docstring)."""

    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 60.0
    max_concurrency: int | None = None
    queue_limit: int | None = None
    overload_retry_s: float = 1.0
    max_request_tokens: int = 32_768
    overhead_tokens: int = 0
    output_tokens_per_row: int = 0
    rtt: float = 0.05
    base_latency: float = 0.5
    per_input_token_s: float = 0.0
    per_output_token_s: float = 0.01
    min_multiplier: float = 0.5
    sigma: float = 0.3
    p_tail: float = 0.0
    tail_alpha: float = 1.5
    tail_cap: float = 20.0
    p_500: float = 0.0
    p_hang: float = 0.0
    seed: int = 0
    limit_mode: Literal["bucket", "calendar"] = "bucket"
    calendar_offset_s: float = 0.0
    headers: Literal["openai", "none", "litellm", "ietf"] = "openai"
    outage: tuple[float, float] | None = None
    bad_key: bool = False

    def is_down(self, t: float) -> bool:
        if self.outage is None:
            return False
        start, duration = self.outage
        return start <= t < start + duration

    def request_tokens(self, n_rows: int, row_tokens: int) -> int:
        return self.overhead_tokens + row_tokens + self.output_tokens_per_row * n_rows

    def fixed_latency(self, n_rows: int, row_tokens: int) -> float:
        input_tokens = self.overhead_tokens + row_tokens
        return (self.base_latency + self.per_input_token_s * input_tokens
                + self.per_output_token_s * self.output_tokens_per_row * n_rows)

    def mean_multiplier(self, samples: int = 200_000) -> float:
        """E[latency / fixed latency] (Monte Carlo, fixed seed): for mean-value bounds."""
        rng = np.random.default_rng(12345)
        m = np.maximum(self.min_multiplier, rng.lognormal(0.0, self.sigma, samples))
        tail = rng.random(samples) < self.p_tail
        m[tail] *= np.minimum(self.tail_cap, rng.pareto(self.tail_alpha, tail.sum()) + 1.0)
        return float(m.mean())


class _Window:
    """A gateway's fixed window: ``per_minute x window_s / 60`` per window, reset at each
    boundary (``offset_s``: where the clock stands in its window at time 0)."""

    def __init__(self, per_minute: float, window_s: float, offset_s: float) -> None:
        self.capacity = per_minute * window_s / 60.0
        self.rate = per_minute / 60.0  # for the headers' per-minute limit
        self.window_s, self.offset_s = window_s, offset_s
        self.level = self.capacity
        self.index: int | None = None
        self.stamp = 0.0

    def refill(self, now: float) -> None:
        self.stamp = now
        index = math.floor((now + self.offset_s) / self.window_s)
        if index != self.index:
            self.index, self.level = index, self.capacity

    def wait_for(self, units: float) -> float:
        if units > self.capacity:
            return math.inf
        if units <= self.level:
            return 0.0
        return self.window_s - (self.stamp + self.offset_s) % self.window_s

    def reset_s(self) -> float:
        return self.window_s - (self.stamp + self.offset_s) % self.window_s


class _Bucket:
    def __init__(self, per_minute: float, burst_s: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = self.rate * burst_s
        self.level = self.capacity
        self.stamp = 0.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, units: float) -> float:
        if units > self.capacity:
            return math.inf
        return max(0.0, (units - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass
class SimStats:
    calls: int = 0
    n429: int = 0
    n500: int = 0
    n400: int = 0
    hangs: int = 0
    down: int = 0  # calls that reached the server while it was down
    n401: int = 0
    tokens_charged: int = 0
    served: Counter[int] = field(default_factory=Counter)
    log: list[dict[str, Any]] = field(default_factory=list)
    client: Counter[str] = field(default_factory=Counter)  # what a runner reports of itself


class SimAPI:
    """The simulated API. ``await call(row_ids)`` -> ``Reply`` or raises ``SimError``."""

    def __init__(self, cfg: SimConfig, workload: Workload, *, keep_log: bool = True) -> None:
        self.cfg = cfg
        self.wl = workload
        self.rng = random.Random(cfg.seed)
        self.stats = SimStats()
        self.keep_log = keep_log
        self.buckets: dict[str, _Bucket | _Window] = {}
        for name, limit in (("requests", cfg.rpm), ("tokens", cfg.tpm)):
            if not limit:
                continue
            if cfg.limit_mode == "calendar":
                self.buckets[name] = _Window(limit, cfg.burst_s, cfg.calendar_offset_s)
            else:
                self.buckets[name] = _Bucket(limit, cfg.burst_s)
        self.in_service = 0
        self.queued = 0
        self.max_in_service = 0
        self._slots: asyncio.Semaphore | None = None
        self._t0: float | None = None

    def now(self) -> float:
        """Seconds since the first call (loop time)."""
        t = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = t
        return round(t - self._t0, 9)

    async def call(self, ids: Sequence[int]) -> Reply:
        ids = [int(i) for i in ids]
        cfg, now = self.cfg, self.now()
        row_tokens = int(self.wl.tokens[ids].sum())
        tokens = cfg.request_tokens(len(ids), row_tokens)
        entry = {"t": now, "ids": ids, "tokens": tokens, "outcome": "ok", "end": None}
        self.stats.calls += 1
        if self.keep_log:
            self.stats.log.append(entry)
        try:
            return await self._handle(entry, ids, row_tokens, tokens, now)
        finally:
            entry["end"] = self.now()  # also when the client cancels (timeout)

    async def _handle(self, entry: dict[str, Any], ids: list[int], row_tokens: int,
                      tokens: int, now: float) -> Reply:
        cfg = self.cfg
        fault, mult, frac = self._draw()
        if cfg.is_down(now):
            entry["outcome"] = "down"
            self.stats.down += 1
            await asyncio.sleep(cfg.rtt)
            msg = "Connection error (simulated outage)"
            raise SimConnectionError(msg)
        if cfg.bad_key:
            entry["outcome"] = "401"
            self.stats.n401 += 1
            await asyncio.sleep(cfg.rtt)
            msg = "Incorrect API key provided: sk-wrong. (simulated)"
            raise SimError(401, msg, None, {}, code="invalid_api_key")
        if tokens > cfg.max_request_tokens:
            return await self._reject(entry, 400, f"request of {tokens} tokens exceeds the "
                                      f"context limit {cfg.max_request_tokens}", None)
        wait = self._admit(now, tokens)
        if math.isinf(wait):
            return await self._reject(entry, 400, f"request of {tokens} tokens exceeds the "
                                      "rate limit's whole bucket", None)
        if wait > _GRACE_S:
            return await self._rate_limited(entry, wait)
        if cfg.queue_limit is not None and self._busy() and self.queued >= cfg.queue_limit:
            return await self._reject(entry, 429, "server overloaded", cfg.overload_retry_s)
        self._charge(tokens)
        headers = self.headers()
        async with self._server_slot():
            return await self._serve(entry, ids, row_tokens, fault, mult, frac, headers)

    def headers(self) -> dict[str, str]:
        """Rate-limit headers of a reply, in the server's ``headers`` style."""
        style = self.cfg.headers
        if style == "none":
            return {}
        if style == "ietf":
            b = self.buckets.get("requests")
            if b is None:
                return {}
            return {"RateLimit-Policy": f'"requests";q={b.capacity:g};w={self.cfg.burst_s:g}',
                    "RateLimit": f'"requests";r={max(0, int(b.level))};t={b.reset_s():.3f}'}
        infix = "api_key-" if style == "litellm" else ""
        out: dict[str, str] = {}
        for name, b in self.buckets.items():
            out[f"x-ratelimit-{infix}limit-{name}"] = str(int(b.rate * 60))  # per minute
            out[f"x-ratelimit-{infix}remaining-{name}"] = str(max(0, int(b.level)))
            if style == "openai":
                out[f"x-ratelimit-reset-{name}"] = f"{b.reset_s():.3f}s"
        return out

    async def _rate_limited(self, entry: dict[str, Any], wait: float) -> Reply:
        """A rate-limit 429 with the hints of the server's header style."""
        style = self.cfg.headers
        if style == "openai":
            hints = {"retry-after": str(max(1, math.ceil(wait))),
                     "retry-after-ms": str(max(1, math.ceil(wait * 1000)))}
            return await self._reject(entry, 429, "rate limit reached", wait, hints)
        hints = ({"llm_provider-retry-after": str(max(1, math.ceil(self.cfg.burst_s)))}
                 if style == "litellm" else
                 {"retry-after": str(max(1, math.ceil(wait)))} if style == "ietf" else {})
        return await self._reject(entry, 429, "rate limit reached", None, hints)

    # -- internals -------------------------------------------------------------------------
    def _draw(self) -> tuple[str | None, float, float]:
        """One call's dice, always the same number of draws (keeps seeds comparable)."""
        c, r = self.cfg, self.rng
        roll, tail_roll, frac = r.random(), r.random(), r.random()
        m = max(c.min_multiplier, r.lognormvariate(0.0, c.sigma)) if c.sigma else 1.0
        pareto = r.paretovariate(c.tail_alpha)
        if tail_roll < c.p_tail:
            m *= min(c.tail_cap, pareto)
        fault = "500" if roll < c.p_500 else "hang" if roll < c.p_500 + c.p_hang else None
        return fault, m, frac

    def _admit(self, now: float, tokens: int) -> float:
        need = {"requests": 1.0, "tokens": float(tokens)}
        wait = 0.0
        for name, b in self.buckets.items():
            b.refill(now)
            wait = max(wait, b.wait_for(need[name]))
        return wait

    def _charge(self, tokens: int) -> None:
        self.stats.tokens_charged += tokens
        if "requests" in self.buckets:
            self.buckets["requests"].level -= 1
        if "tokens" in self.buckets:
            self.buckets["tokens"].level -= tokens

    def _busy(self) -> bool:
        cap = self.cfg.max_concurrency
        return cap is not None and self.in_service >= cap

    async def _reject(self, entry: dict[str, Any], status: int, msg: str,
                      retry_after: float | None, hints: dict[str, str] | None = None) -> Reply:
        entry["outcome"] = str(status)
        if status == 429:
            self.stats.n429 += 1
        else:
            self.stats.n400 += 1
        await asyncio.sleep(self.cfg.rtt)
        raise SimError(status, msg, retry_after, {**self.headers(), **(hints or {})})

    def _server_slot(self) -> _Slot:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrency or 1 << 30)
        return _Slot(self, self._slots)

    async def _serve(self, entry: dict[str, Any], ids: list[int], row_tokens: int,
                     fault: str | None, mult: float, frac: float,
                     headers: dict[str, str]) -> Reply:
        cfg = self.cfg
        latency = cfg.fixed_latency(len(ids), row_tokens) * mult
        if any(i in self.wl.poison for i in ids):
            entry["outcome"] = "400"
            self.stats.n400 += 1
            await asyncio.sleep(latency * 0.5)
            raise SimError(400, "invalid input (poison row)", None, headers)
        if fault == "500":
            entry["outcome"] = "500"
            self.stats.n500 += 1
            await asyncio.sleep(latency * frac)
            raise SimError(500, "internal server error", None, headers)
        if fault == "hang":
            entry["outcome"] = "hang"
            self.stats.hangs += 1
            await asyncio.get_running_loop().create_future()  # never set: only a timeout ends it
        await self._sleep_unless_outage(entry, latency)
        self.stats.served.update(ids)
        input_tokens = cfg.overhead_tokens + row_tokens
        return Reply([expected_output(i) for i in ids], input_tokens,
                     cfg.output_tokens_per_row * len(ids), headers)


    async def _sleep_unless_outage(self, entry: dict[str, Any], latency: float) -> None:
        """Serve for ``latency``; a call still in service when the outage starts dies then."""
        out = self.cfg.outage
        now = self.now()
        if out is None or not now < out[0] < now + latency:
            await asyncio.sleep(latency)
            return
        await asyncio.sleep(out[0] - now)
        entry["outcome"] = "reset"
        msg = "Connection reset (simulated outage)"
        raise SimConnectionError(msg)


class _Slot:
    """One server slot: waits FIFO when the server is at ``max_concurrency``."""

    def __init__(self, api: SimAPI, sem: asyncio.Semaphore) -> None:
        self.api = api
        self.sem = sem

    async def __aenter__(self) -> None:
        self.api.queued += 1
        try:
            await self.sem.acquire()
        finally:
            self.api.queued -= 1
        self.api.in_service += 1
        self.api.max_in_service = max(self.api.max_in_service, self.api.in_service)

    async def __aexit__(self, *exc: object) -> None:
        self.api.in_service -= 1
        self.sem.release()
