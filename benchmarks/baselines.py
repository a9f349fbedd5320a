"""Hand-written baselines: what a competent user writes instead of dfbatch.

Every runner gets the same ``Knobs`` (the knowledge dfbatch gets: limits, token counts, the
server's context limit, concurrency caps, timeout, retry budget) and shares one retry policy:

- ``max_attempts`` calls per request; retried: timeouts, 408 / 409 / 429 / 5xx; the wait is the
  server's ``retry_after`` plus a little jitter, else full-jitter exponential backoff
  (``backoff_base * 2**n`` capped at ``backoff_max``) -- as ``tenacity`` or the OpenAI SDK do;
- a multi-row request that fails with a non-retryable error (400: a poison row, a request too
  large) falls back to one request per row, so good rows are not thrown away with a bad one.

The runners (fixed batches of ``items_per_batch`` rows in input order, unless said otherwise):

``gather``
    ``asyncio.gather`` over all batches, an ``asyncio.Semaphore(max_in_flight)`` held for the
    whole retry loop (the usual ``async with sem: await retrying_call()``).
``aiometer``
    ``aiometer.run_all(max_at_once=max_in_flight, max_per_second=...)`` where the rate is
    ``min(rpm, tpm / mean request tokens) / 60``: the request rate a user derives from the
    published limits. Retries run inside the task (aiometer meters task starts only).
``cookbook``
    OpenAI's cookbook "API request parallel processor" adapted to batches: the client keeps
    RPM and TPM buckets (one minute's capacity, starting full) and sends a request only when
    both can pay for it; every attempt is charged; after a 429 all sending pauses for
    ``cooldown_s`` (15 s, or the server's retry-after if longer); other errors are re-queued at
    once; no concurrency cap (as in the cookbook). It sleeps until capacity suffices instead of
    polling every millisecond (same behaviour, less CPU).
``seed-rr``
    The seed guide's design: ``agents`` agents, batches dealt ``i % agents``, each agent runs
    its batches under ``Semaphore(per_agent)`` plus a global ``Semaphore(max_in_flight)``
    (the seed's resource manager); batches over ``token_limit`` are split in halves before
    sending. No rate limiter (the seed has none); retries honour retry-after.
``seed-lpt``
    As ``seed-rr``, but batches are assigned by LPT on tokens (heaviest first, to the least
    loaded agent), the seed's ``LoadBalancer``.
``handwritten``
    The ~80-line client a careful engineer writes against a provider that enforces per
    second (``HandWritten``; the bar dfbatch must beat): RPM and TPM token buckets holding
    *one second* of the limits, each request charged its exact cost (prompt + ``max_tokens``)
    before it is sent, at most ``max_in_flight`` in flight, and on a 429 a *global* pause of
    every send for the server's ``retry-after`` / ``retry-after-ms`` (else 1 s, doubling up to
    60 s while 429s keep coming); 429s do not use up attempts. Other retryable errors back off
    per request (full jitter); non-retryable ones take the shared per-row fallback.

A server's retry hint is read as the OpenAI SDK exposes it: ``exc.retry_after`` if set, else
the ``retry-after-ms`` / ``retry-after`` headers (``hint_of``).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import aiometer
import numpy as np

from benchmarks.simapi import Reply, SimAPI, Workload

_RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Knobs:
    """What every runner is told (dfbatch included): same knowledge, same retry budget."""

    items_per_batch: int = 4
    agents: int = 4  # the seed's 2 agents per core on a 2-core machine
    per_agent: int = 8  # the seed's concurrent batches per agent
    max_in_flight: int = 32  # the seed's 16 x cores
    token_limit: int = 32_768  # the server's context limit
    rpm: float | None = None
    tpm: float | None = None
    overhead_tokens: int = 0  # system prompt per request
    output_tokens_per_row: int = 0  # max_tokens per row
    timeout: float = 60.0
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    cooldown_s: float = 15.0  # the cookbook's pause after a 429

    def request_tokens(self, wl: Workload, ids: list[int]) -> int:
        return (self.overhead_tokens + int(wl.tokens[ids].sum())
                + self.output_tokens_per_row * len(ids))


@dataclass
class Sink:
    """Per-row results of one run; a row recorded twice counts as a duplicate."""

    outputs: dict[int, str] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0

    def ok(self, ids: list[int], outputs: list[str]) -> None:
        for i, out in zip(ids, outputs, strict=True):
            self._seen(i)
            self.outputs[i] = out

    def fail(self, ids: list[int], exc: BaseException) -> None:
        for i in ids:
            self._seen(i)
            self.errors[i] = f"{type(exc).__name__}: {exc}"

    def _seen(self, i: int) -> None:
        self.duplicates += i in self.outputs or i in self.errors


Call = Callable[[list[int]], Awaitable[Reply]]


# -- the shared retry policy ---------------------------------------------------------------
def hint_of(exc: BaseException) -> float | None:
    """The server's wait hint: ``exc.retry_after``, else ``retry-after-ms`` / ``retry-after``."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)):
        return float(value)
    headers = getattr(exc, "headers", None) or {}
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    if "retry-after" in headers:
        return float(headers["retry-after"])
    return None


def retryable(exc: BaseException) -> tuple[bool, float | None]:
    """(retry?, server's retry-after) -- the same rules dfbatch.execute._retry applies."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True, None
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        return False, None
    retry = status in _RETRY_STATUS or status >= 500
    return retry, hint_of(exc) if retry else None


def wait_s(attempt: int, hint: float | None, k: Knobs, rng: random.Random) -> float:
    ceiling = min(k.backoff_max, k.backoff_base * 2 ** (attempt - 1))
    if hint is not None:
        return hint + rng.uniform(0, min(ceiling, max(0.05, 0.25 * hint)))
    return rng.uniform(0, ceiling)


async def with_retries(api: SimAPI, k: Knobs, rng: random.Random, ids: list[int]) -> Reply:
    for attempt in range(1, k.max_attempts + 1):
        try:
            return await asyncio.wait_for(api.call(ids), k.timeout)
        except Exception as exc:
            retry, hint = retryable(exc)
            if not retry or attempt == k.max_attempts:
                raise
            await asyncio.sleep(wait_s(attempt, hint, k, rng))
    msg = "unreachable"
    raise AssertionError(msg)


async def do_batch(call: Call, sink: Sink, ids: list[int]) -> None:
    """One request; on a non-retryable failure of several rows, one request per row."""
    try:
        reply = await call(ids)
    except Exception as exc:
        if len(ids) > 1 and not retryable(exc)[0]:
            await asyncio.gather(*(do_batch(call, sink, [i]) for i in ids))
        else:
            sink.fail(ids, exc)
        return
    sink.ok(ids, reply.outputs)


def fixed_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


# -- 1. asyncio.gather + Semaphore ---------------------------------------------------------
async def run_gather(api: SimAPI, wl: Workload, k: Knobs, seed: int) -> Sink:
    sink, rng = Sink(), random.Random(seed)
    sem = asyncio.Semaphore(k.max_in_flight)
    call = partial(with_retries, api, k, rng)

    async def one(ids: list[int]) -> None:
        async with sem:
            await do_batch(call, sink, ids)

    await asyncio.gather(*(one(b) for b in fixed_batches(wl.n, k.items_per_batch)))
    return sink


# -- 2. aiometer ---------------------------------------------------------------------------
def request_rate(wl: Workload, k: Knobs, batches: list[list[int]]) -> float | None:
    """Requests per second a user derives from rpm and tpm and the mean request size."""
    per_min = []
    if k.rpm:
        per_min.append(k.rpm)
    if k.tpm:
        mean = float(np.mean([k.request_tokens(wl, b) for b in batches]))
        per_min.append(k.tpm / mean)
    return min(per_min) / 60.0 if per_min else None


async def run_aiometer(api: SimAPI, wl: Workload, k: Knobs, seed: int) -> Sink:
    sink, rng = Sink(), random.Random(seed)
    call = partial(with_retries, api, k, rng)
    batches = fixed_batches(wl.n, k.items_per_batch)
    jobs = [partial(do_batch, call, sink, b) for b in batches]
    await aiometer.run_all(jobs, max_at_once=k.max_in_flight,
                           max_per_second=request_rate(wl, k, batches))
    return sink


# -- 3. the OpenAI cookbook's parallel request processor -----------------------------------
class _Capacity:
    """The cookbook's client-side buckets: one minute's worth, refilled continuously."""

    def __init__(self, per_minute: float | None) -> None:
        self.max = per_minute or math.inf
        self.level = self.max
        self.t = 0.0

    def update(self, now: float) -> None:
        if self.max != math.inf:
            self.level = min(self.max, self.level + self.max * (now - self.t) / 60.0)
        self.t = now

    def wait(self, units: float) -> float:
        return 0.0 if self.level >= units else (units - self.level) * 60.0 / self.max


@dataclass
class _Request:
    ids: list[int]
    tokens: int
    attempts_left: int


class _Cookbook:
    def __init__(self, api: SimAPI, wl: Workload, k: Knobs) -> None:
        self.api, self.wl, self.k = api, wl, k
        self.sink = Sink()
        self.requests = _Capacity(k.rpm)
        self.tokens = _Capacity(k.tpm)
        self.retry: asyncio.Queue[_Request] = asyncio.Queue()
        self.in_progress = 0
        self.last_429 = -math.inf
        self.pause_s = k.cooldown_s
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    def request(self, ids: list[int]) -> _Request:
        return _Request(ids, self.k.request_tokens(self.wl, ids), self.k.max_attempts)

    async def run(self) -> Sink:
        loop = asyncio.get_running_loop()
        self.requests.t = self.tokens.t = loop.time()
        fresh = iter(fixed_batches(self.wl.n, self.k.items_per_batch))
        nxt: _Request | None = None
        while True:
            if nxt is None:
                if not self.retry.empty():
                    nxt = self.retry.get_nowait()
                elif (ids := next(fresh, None)) is not None:
                    nxt = self.request(ids)
            if nxt is None:
                if self.in_progress == 0:
                    break
                await self._idle(None)
                continue
            if (cool := self.last_429 + self.pause_s - loop.time()) > 0:
                await asyncio.sleep(cool)  # the cookbook's pause after a rate-limit error
            now = loop.time()
            self.requests.update(now)
            self.tokens.update(now)
            need = max(self.requests.wait(1), self.tokens.wait(nxt.tokens))
            if need > 0:
                await self._idle(max(need, 0.001))  # the cookbook polls every millisecond
                continue
            self.requests.level -= 1
            self.tokens.level -= nxt.tokens
            nxt.attempts_left -= 1
            self._start(nxt)
            nxt = None
        await asyncio.gather(*self.tasks)
        return self.sink

    async def _idle(self, seconds: float | None) -> None:
        """Wait for capacity (``seconds``) or for a request to come back for a retry."""
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), seconds)
        except TimeoutError:
            pass

    def _start(self, req: _Request) -> None:
        self.in_progress += 1
        task = asyncio.create_task(self._call(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, req: _Request) -> None:
        try:
            reply = await asyncio.wait_for(self.api.call(req.ids), self.k.timeout)
        except Exception as exc:
            self._failed(req, exc)
        else:
            self.sink.ok(req.ids, reply.outputs)
        finally:
            self.in_progress -= 1
            self.wake.set()

    def _failed(self, req: _Request, exc: Exception) -> None:
        retry, hint = retryable(exc)
        if getattr(exc, "status_code", None) == 429:
            self.last_429 = asyncio.get_running_loop().time()
            self.pause_s = max(self.k.cooldown_s, hint or 0.0)
        if retry and req.attempts_left > 0:
            self.retry.put_nowait(req)
        elif not retry and len(req.ids) > 1:  # one request per row (shared fallback)
            for i in req.ids:
                self.retry.put_nowait(self.request([i]))
        else:
            self.sink.fail(req.ids, exc)


async def run_cookbook(api: SimAPI, wl: Workload, k: Knobs, seed: int) -> Sink:
    return await _Cookbook(api, wl, k).run()


# -- 4 / 5. the seed's static agents -------------------------------------------------------
def round_robin(batches: list[list[int]], agents: int, wl: Workload, k: Knobs
                ) -> list[list[list[int]]]:
    return [batches[a::agents] for a in range(agents)]


def lpt(batches: list[list[int]], agents: int, wl: Workload, k: Knobs) -> list[list[list[int]]]:
    out: list[list[list[int]]] = [[] for _ in range(agents)]
    loads = [0] * agents
    for b in sorted(batches, key=lambda b: -k.request_tokens(wl, b)):
        a = loads.index(min(loads))
        out[a].append(b)
        loads[a] += k.request_tokens(wl, b)
    return out


def _split(ids: list[int], wl: Workload, k: Knobs) -> list[list[int]]:
    """The seed's ``_process_split_batch``: halve a batch over ``token_limit``."""
    if len(ids) == 1 or k.request_tokens(wl, ids) <= k.token_limit:
        return [ids]
    mid = len(ids) // 2
    return _split(ids[:mid], wl, k) + _split(ids[mid:], wl, k)


Assign = Callable[[list[list[int]], int, Workload, Knobs], list[list[list[int]]]]


async def run_seed(api: SimAPI, wl: Workload, k: Knobs, seed: int, assign: Assign) -> Sink:
    sink, rng = Sink(), random.Random(seed)
    call = partial(with_retries, api, k, rng)
    global_slots = asyncio.Semaphore(k.max_in_flight)
    plan = assign(fixed_batches(wl.n, k.items_per_batch), k.agents, wl, k)

    async def agent(mine: list[list[int]]) -> None:
        slots = asyncio.Semaphore(k.per_agent)

        async def one(ids: list[int]) -> None:
            async with slots, global_slots:
                await asyncio.gather(*(do_batch(call, sink, part) for part in _split(ids, wl, k)))

        await asyncio.gather(*(one(b) for b in mine))

    await asyncio.gather(*(agent(mine) for mine in plan))
    return sink


# -- 6. the hand-written client: 1-s buckets, exact cost, a global pause on 429 ---------------
class _Second:
    """A client-side token bucket holding one second of a per-minute limit, starting full."""

    def __init__(self, per_minute: float | None) -> None:
        self.rate = (per_minute or math.inf) / 60.0
        self.level = self.capacity = self.rate
        self.t = 0.0

    def wait(self, now: float, units: float) -> float:
        if self.rate == math.inf:
            return 0.0
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        return max(0.0, (min(units, self.capacity) - self.level) / self.rate)


class HandWritten:
    """One dispatcher sends requests in order when both buckets can pay and no pause holds."""

    def __init__(self, api: SimAPI, wl: Workload, k: Knobs, seed: int) -> None:
        self.api, self.wl, self.k = api, wl, k
        self.sink, self.rng = Sink(), random.Random(seed)
        self.rpm, self.tpm = _Second(k.rpm), _Second(k.tpm)
        self.slots = asyncio.Semaphore(k.max_in_flight)
        self.pause_until, self.pause_s = 0.0, 0.0
        self.queue: asyncio.Queue[tuple[list[int], int] | None] = asyncio.Queue()
        self.open = 0

    async def run(self) -> Sink:
        for ids in fixed_batches(self.wl.n, self.k.items_per_batch):
            self.queue.put_nowait((ids, 0))
        self.open = self.queue.qsize()
        async with asyncio.TaskGroup() as tg:
            while (item := await self.queue.get()) is not None:  # None: every row is done
                ids, attempt = item
                await self._admit(self.k.request_tokens(self.wl, ids))
                await self.slots.acquire()
                tg.create_task(self._send(ids, attempt))
        return self.sink

    async def _admit(self, cost: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wait = max(self.pause_until - now, self.rpm.wait(now, 1), self.tpm.wait(now, cost))
            if wait <= 0:
                self.rpm.level -= 1
                self.tpm.level -= cost
                return
            await asyncio.sleep(wait)

    async def _send(self, ids: list[int], attempt: int) -> None:
        try:
            reply = await asyncio.wait_for(self.api.call(ids), self.k.timeout)
        except Exception as exc:
            self.slots.release()
            await self._failed(ids, attempt, exc)
        else:
            self.slots.release()
            self.pause_s = 0.0
            self.sink.ok(ids, reply.outputs)
            self._done()

    async def _failed(self, ids: list[int], attempt: int, exc: Exception) -> None:
        retry, hint = retryable(exc)
        if getattr(exc, "status_code", None) == 429 and attempt < 50:
            self.pause_s = min(60.0, max(1.0, 2 * self.pause_s))  # no hint: 1, 2, 4 ... 60 s
            wait = hint if hint is not None else self.pause_s
            self.pause_until = max(self.pause_until, asyncio.get_running_loop().time() + wait)
            self.queue.put_nowait((ids, attempt + 1))  # 429s do not use up attempts
            return
        if retry and attempt + 1 < self.k.max_attempts:
            await asyncio.sleep(wait_s(attempt + 1, hint, self.k, self.rng))
            self.queue.put_nowait((ids, attempt + 1))
            return
        if not retry and len(ids) > 1:  # the shared per-row fallback
            self.open += len(ids)
            for i in ids:
                self.queue.put_nowait(([i], 0))
        else:
            self.sink.fail(ids, exc)
        self._done()

    def _done(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.queue.put_nowait(None)


async def run_handwritten(api: SimAPI, wl: Workload, k: Knobs, seed: int) -> Sink:
    return await HandWritten(api, wl, k, seed).run()


Runner = Callable[[SimAPI, Workload, Knobs, int], Awaitable[Sink]]
BASELINES: dict[str, Runner] = {
    "gather": run_gather,
    "aiometer": run_aiometer,
    "cookbook": run_cookbook,
    "seed-rr": partial(run_seed, assign=round_robin),
    "seed-lpt": partial(run_seed, assign=lpt),
    "handwritten": run_handwritten,
}
