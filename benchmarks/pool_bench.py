"""dfbatch versus what users write by hand, against a simulated rate-limited API.

Run: ``.venv/bin/python benchmarks/pool_bench.py`` (all scenarios, 3 seeds; ~90 s of CPU for the
first seven, ~5 min more for the provider models (``--only providers``), spread
over ``--jobs`` processes, one per core by default). Options: ``--seeds 5``, ``--only tpm,rpm``,
``--runners dfbatch,cookbook``, ``--rows 0.5`` (scale the row counts), ``--jobs 1``, ``--trace
tpm`` (print dfbatch's event counts and a coarse timeline for one seed).

Every runner (``dfbatch`` and the baselines in ``baselines.py``) processes the same rows against
the same ``SimAPI`` (``simapi.py``) with the same ``Knobs``: the server's rpm / tpm, its context
limit, the token counts, 4 rows per batch, 4 agents x 8 and 32 in flight (the seed's defaults on
2 cores), timeout, 6 attempts. Time is simulated (``simapi.VirtualClockLoop``): makespans are in
simulated seconds of a realistic API (calls of ~1-5 s, limits per minute), computed in a fraction
of the time; CPU overhead is not part of them (see ``overhead_bench.py`` for that).

Scenarios and their lower bounds
--------------------------------
Latency of a request = fixed part (base + per input token + per output token) x a random
multiplier (>= 0.5, mean ``E[m]``). ``B`` / ``T`` = requests / charged tokens of the good rows
packed ``items_per_batch`` to a request (poison and oversize rows excluded); ``cap`` = the
server bucket's capacity (one minute's limit, full at t=0); ``L`` = the smallest possible
latency of a request.

latency  no rate limits; the server serves 32 at once (the rest queue); heavy tail (3% of calls
         x Pareto(1.5), capped at 10x). Bound (mean-value, not strict): sum(fixed latency) x
         E[m] / 32 server slots.
tpm      TPM binds. Bound: (T - cap) / (tpm / 60) + L.
rpm      RPM binds (small rows). Bound: (B - cap) / (rpm / 60) + L.
faults   as tpm, plus 5% 500s, 1% hangs (30 s timeout), 1% poison rows, one row over the
         context limit. Bound: as tpm (faults only add to it).
skewed   Pareto-sized rows (a few 20x the mean) and one row over the context limit; prefill-heavy
         latency; no rate limits; 32 server slots. Bound: as latency.
tpm-1s   (extra) as tpm, but the server's bucket holds 1 s of refill (a provider that enforces
         its per-minute limit per second): clients that assume a minute's burst get 429s.
tpm-blind (extra) as tpm, but no runner is told rpm / tpm: only 429s and retry-after guide them.

Provider models (``--only providers`` runs them all; each prints the issue's target and a
PASS / FAIL per dfbatch row). ``row-*`` scenarios use a *per-row adapter*: the fn sends one
request per row of its batch, concurrently, like ``dfbatch.llm.chat`` in its default mode, and
charges each request to the run's limits through ``dfbatch.limits.request(tokens=n)`` where
this dfbatch has it (feature-detected; otherwise it charges nothing itself). Baselines send one
row per request there (what a hand-written per-row client does). Bounds count one request per
row.

row-tpm-1s       per-row, TPM-bound, 1-s buckets, OpenAI headers.
row-tpm-1s-none  the same with no rate-limit headers at all (a 429 says nothing).
row-rpm-1s-none  per-row, RPM-bound, 1-s buckets, no headers.
row-rpm          per-row, RPM-bound, a minute's bucket: is ``rpm`` charged per request?
                 (max/10s: the most requests the server saw in any 10 s.)
tpm-1s-none      a batch fn (one request per batch), TPM-bound, 1-s buckets, no headers.
rpm-1s-none      a batch fn, RPM-bound, 1-s buckets, no headers (bigger batches help here:
                 the bound assumes 4 rows per request, so a runner that packs more beats it).
row-blind-1s     as row-tpm-1s-none, but nobody is told the limits.
row-rpm-blind-1s-none / -ietf (extra)  as row-rpm-1s-none, nobody told; with no headers, or
                 with only the IETF draft's ``RateLimit-Policy`` / ``RateLimit`` fields.
gateway-minute   a gateway (LiteLLM): calendar-minute window, the clock at :30 at the start,
                 per-key ``x-ratelimit-api_key-*`` headers and 429s whose only hint is
                 ``llm_provider-retry-after: 60``; per-row, told the true rpm. Bound: the
                 start of the calendar window that admits the last request, + L.
gateway-rpm60    the same gateway (150 RPM) with every runner told ``rpm=60``: the server must
                 never see more than 60 x T / 60 + 1 requests in any T s (T = 10, 60).
                 Bound: the told rpm's pace.
outage           as tpm with a 60-s bucket and a 20-s outage from t = 30 s (connections
                 refused; calls in service then are reset). Bound: tpm's, + the time the
                 buckets sit full while it is down, and not before it ends.
bad-key          every call is a 401 ``invalid_api_key``: how many calls until the run stops
                 (stopped after 600 simulated s).

Tail scenarios (``--only tails``; issue 12 item 5): no rate limit and no server slot cap, so
the only cap is the runners' 32 in flight. Bound (mean-value): sum(fixed latency) x E[m] / 32.
Targets compare dfbatch with the baselines under that same cap (the cookbook, told no limit,
sends every request at once).

tail-lognormal   latency x lognormal(sigma = 1): <= 0.8x gather's makespan.
tail-hangs       1% of calls never return, timeout 4 s (calls of ~1.5 s, so the timeout catches
                 the hangs, not ordinary calls): <= 0.8x the best baseline.
tail-skewed      Pareto-sized rows, prefill-heavy latency, one oversize row: <= 0.9x the best.
Each: hedged duplicates <= 5% of dfbatch's attempts (column hedged, from its events).

Extra columns: 429/req (429s / requests), calls/row (requests / rows); per scenario: failed
(good rows that ended with an error, worst seed), dead r/s (most requests reaching the dead
server in any 1 s), max/10s and max/60s (most requests the server saw in any 10 / 60 s).

Columns: makespan (median over seeds, simulated s), x bound (median makespan / bound), ok /
lost / dup (good rows answered correctly, good rows without their answer, rows answered more
than once -- worst seed), poison alone (poison rows whose last call held only that row, worst
seed), 429s, calls and ktokens (tokens the server charged, all attempts; median), cpu s (CPU
seconds of all seeds' runs). The headline compares each dfbatch row with the fastest baseline
that lost no row (if every baseline lost rows: the one that lost the fewest).

``dfbatch`` runs with its defaults; ``dfbatch+`` with ``rate_burst=1.0`` (a minute's burst, like
the provider's bucket) and ``dynamic_batching=True``; ``dfbatch-hedge`` (latency only) with
``hedge_after=0.9``. Settings this dfbatch does not know are dropped. ``handwritten`` is the
issue's bar: 1-s client buckets, exact cost, a global pause on 429 (see ``baselines.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfbatch
from benchmarks.baselines import BASELINES, Knobs, Runner, Sink, fixed_batches
from benchmarks.simapi import SimAPI, SimConfig, SimError, Workload, expected_output, run
from dfbatch.config import cpu_cores
from dfbatch.sim.stats import max_in_sliding_window

OVERSIZE_TOKENS = 40_000
TIE = 1e-3  # makespans within 0.1% of each other are a tie
DEADLINE = 8.0  # a run is stopped after this many times its lower bound (simulated time)


# -- dfbatch as a runner -------------------------------------------------------------------
def dfbatch_settings(k: Knobs, seed: int) -> dict[str, Any]:
    """The same knowledge and budget the baselines get, as dfbatch settings."""
    return dict(items_per_batch=k.items_per_batch, agents=k.agents,
                max_concurrent_batches=k.per_agent, max_in_flight=k.max_in_flight,
                token_limit=k.token_limit, request_overhead_tokens=k.overhead_tokens,
                output_tokens_per_row=k.output_tokens_per_row, rpm=k.rpm, tpm=k.tpm,
                timeout=k.timeout, max_attempts=k.max_attempts, backoff_base=k.backoff_base,
                backoff_max=k.backoff_max, seed=seed, progress=False)


def frame_of(wl: Workload) -> tuple[pl.DataFrame, Callable[[list[str]], list[int]]]:
    texts = wl.texts()
    lookup = dict(zip(texts, wl.tokens.tolist(), strict=True))
    df = pl.DataFrame({"id": np.arange(wl.n), "text": texts})
    return df, lambda ts: [lookup[t] for t in ts]


def api_fn(api: SimAPI) -> Callable[[pl.DataFrame], Any]:
    async def fn(batch: pl.DataFrame) -> list[str]:
        reply = await api.call(batch["id"].to_list())
        dfbatch.report_usage(reply.input_tokens, reply.output_tokens, headers=reply.headers)
        return reply.outputs

    return fn


def request_charger() -> Callable[..., Any] | None:
    """``dfbatch.limits.request`` (charge one HTTP request to the run's limits) where this
    dfbatch has it -- the planned API -- else None (the fn then charges nothing itself)."""
    try:
        from dfbatch import limits
    except ImportError:
        return None
    return getattr(limits, "request", None)


def per_row_fn(api: SimAPI, wl: Workload, k: Knobs) -> Callable[[pl.DataFrame], Any]:
    """A per-row adapter, like ``dfbatch.llm.chat(mode="per_row")``: one request per row, the
    batch's requests concurrently; a row the server rejects as bad (400) is that row's error;
    any other failure fails the call (the worst: a 429 with the longest hint), and rows
    already answered are kept for the retry instead of being requested again."""
    charge = request_charger()
    kept: dict[int, Any] = {}

    async def one(i: int) -> Any:
        if i in kept:
            return kept.pop(i)
        if charge is None:
            return await api.call([i])
        async with charge(tokens=k.request_tokens(wl, [i])) as req:
            answer = await api.call([i])
            if hasattr(req, "report"):  # the answer's rate-limit headers and real tokens
                req.report(headers=answer.headers,
                           tokens=answer.input_tokens + answer.output_tokens)
            return answer

    async def fn(batch: pl.DataFrame) -> list[Any]:
        ids = batch["id"].to_list()
        outcomes = await asyncio.gather(*(one(i) for i in ids), return_exceptions=True)
        out: list[Any] = []
        for o in outcomes:
            if isinstance(o, SimError) and o.status_code in (400, 413, 422):
                o = dfbatch.RowError(str(o))
            elif not isinstance(o, BaseException):
                dfbatch.report_usage(o.input_tokens, o.output_tokens, headers=o.headers)
            out.append(o)
        failures = [o for o in out if isinstance(o, BaseException)
                    and not isinstance(o, dfbatch.RowError)]
        if failures:
            kept.update((i, o) for i, o in zip(ids, outcomes, strict=True)
                        if not isinstance(o, BaseException))
            limited = [f for f in failures if getattr(f, "status_code", None) == 429]
            raise max(limited, key=lambda f: getattr(f, "retry_after", None) or 0.0) \
                if limited else failures[0]
        return [o if isinstance(o, dfbatch.RowError) else o.outputs[0] for o in out]

    mark = getattr(getattr(dfbatch, "limits", None), "per_request", None)
    return mark(fn) if charge is not None and mark is not None else fn  # charges per request


async def run_dfbatch(api: SimAPI, wl: Workload, k: Knobs, seed: int,
                      on_event: Callable[[Any], None] | None = None, per_row: bool = False,
                      **extra: Any) -> Sink:
    df, encoding = frame_of(wl)
    known = {f.name for f in dataclasses.fields(dfbatch.BatchConfig)}
    settings = {**dfbatch_settings(k, seed), **{n: v for n, v in extra.items() if n in known}}
    fn = per_row_fn(api, wl, k) if per_row else api_fn(api)
    counts = api.stats.client

    def count(ev: Any) -> None:  # hedged duplicates and attempts, for the hedged column
        name = type(ev).__name__
        if name in ("BatchHedged", "BatchStarted"):
            counts["hedged" if name == "BatchHedged" else "started"] += 1
        if on_event is not None:
            on_event(ev)

    stopped = getattr(dfbatch, "RunStoppedError", ())  # (this dfbatch may not stop runs)
    try:
        out = await dfbatch.aprocess(df, fn, text="text", encoding=encoding,
                                     on_event=count, **settings)
    except stopped as exc:  # a fatal error stopped the run: its partial result counts
        out = exc.partial
    sink = Sink()
    for i, value, err in out.select("id", "output", "error").iter_rows():
        if err is None:
            sink.ok([i], [value])
        else:
            sink.fail([i], RuntimeError(err))
    return sink


# dfbatch+: opt-in settings a user who knows the provider would turn on (not the defaults):
# a minute's burst like the provider's bucket, and dynamic batch sizing.
TUNED: dict[str, Any] = {"rate_burst": 1.0, "dynamic_batching": True}
RUNNERS: dict[str, Runner] = {
    "dfbatch": run_dfbatch,
    "dfbatch+": partial(run_dfbatch, **TUNED),
    **BASELINES,
}
# shown only where a scenario asks for it (hedging costs tokens: off by default)
VARIANTS: dict[str, Runner] = {"dfbatch-hedge": partial(run_dfbatch, hedge_after=0.9)}


# -- scenarios -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The issue's targets for dfbatch (default settings) in one scenario; None = no target."""

    x_bound: float | None = None  # makespan / lower bound
    n429: float | None = None  # 429s / requests
    failed: int | None = None  # good rows ending with an error
    dead_rps: float | None = None  # requests reaching the dead server in any 1 s
    calls: int | None = None  # requests in all (bad key: until the run stops)
    vs_best: float | None = None  # makespan / the best baseline's ...
    among: tuple[str, ...] = ()  # ... among these baselines (default: all)
    vs: str | None = None  # at least as fast as this baseline (same run) ...
    vs_x: float = 1.0  # ... times this
    hedged: float | None = None  # hedged duplicates / attempts (dfbatch's events)
    window_rpm: float | None = None  # never more than rpm x T / 60 + 1 requests in T s

    def text(self) -> str:
        parts = []
        if self.x_bound is not None:
            parts.append(f"<={self.x_bound:g}x bound")
        if self.n429 is not None:
            parts.append(f"429s <={self.n429:.1%}")
        if self.failed is not None:
            parts.append(f"failed <={self.failed}")
        if self.dead_rps is not None:
            parts.append(f"<={self.dead_rps:g} req/s to the dead server")
        if self.calls is not None:
            parts.append(f"<={self.calls} calls")
        if self.vs_best is not None:
            among = f" ({', '.join(self.among)})" if self.among else ""
            parts.append(f"<={self.vs_best:g}x best baseline{among}")
        if self.vs is not None:
            parts.append(f"<={self.vs_x:g}x {self.vs}'s makespan")
        if self.hedged is not None:
            parts.append(f"hedges <={self.hedged:.0%} of calls")
        if self.window_rpm is not None:
            parts.append(f"<={self.window_rpm:g}xT/60+1 requests in any T s")
        return ", ".join(parts)


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    server: SimConfig
    mean_tokens: float = 150.0
    skew: float = 0.0
    poison_frac: float = 0.0
    oversize: int = 0
    timeout: float = 60.0
    told: bool = True  # are the runners told the server's rpm / tpm?
    extra_runners: tuple[str, ...] = ()  # dfbatch variants worth showing here only
    per_row: bool = False  # the fn sends one request per row (baselines: 1 row / request)
    told_rpm: float | None = None  # tell the runners this rpm instead of the server's
    deadline_s: float | None = None  # stop after this many simulated s (default: 8 x bound)
    target: Target | None = None
    columns: tuple[str, ...] = ()  # extra metrics: failed, dead r/s, max/10s, max/60s

    def workload(self, seed: int, rows_scale: float) -> Workload:
        n = max(40, round(self.rows * rows_scale))
        over = [n // 3] if self.oversize else []
        return Workload.make(n, mean_tokens=self.mean_tokens, seed=seed, skew=self.skew,
                             poison_frac=self.poison_frac, oversize=over,
                             oversize_tokens=OVERSIZE_TOKENS)

    def knobs(self) -> Knobs:
        s = self.server
        rpm, tpm = (s.rpm, s.tpm) if self.told else (None, None)
        rpm = self.told_rpm if self.told_rpm is not None else rpm
        return Knobs(rpm=rpm, tpm=tpm, token_limit=s.max_request_tokens,
                     overhead_tokens=s.overhead_tokens,
                     output_tokens_per_row=s.output_tokens_per_row, timeout=self.timeout)


_SERVER = SimConfig(overhead_tokens=150, output_tokens_per_row=40, base_latency=0.6,
                    per_input_token_s=0.0002, per_output_token_s=0.012, sigma=0.35)
SCENARIOS = [
    Scenario("latency", 3000, replace(_SERVER, max_concurrency=32, p_tail=0.03, tail_cap=10.0),
             extra_runners=("dfbatch-hedge",)),
    Scenario("tpm", 4000, replace(_SERVER, tpm=150_000, rpm=3_000)),
    Scenario("rpm", 4000, replace(_SERVER, rpm=200, tpm=1_000_000), mean_tokens=60.0),
    Scenario("faults", 3000, replace(_SERVER, tpm=150_000, rpm=3_000, p_500=0.05, p_hang=0.01),
             poison_frac=0.01, oversize=1, timeout=30.0),
    Scenario("skewed", 3000, replace(_SERVER, max_concurrency=32, per_input_token_s=0.001),
             skew=0.6, oversize=1),
    # extra: the server enforces its TPM per second (bucket = 1 s of refill, not a minute)
    Scenario("tpm-1s", 2000, replace(_SERVER, tpm=150_000, rpm=3_000, burst_s=1.0)),
    # extra: the same TPM limit, but nobody is told it (adaptive concurrency / backoff only)
    Scenario("tpm-blind", 2000, replace(_SERVER, tpm=150_000, rpm=3_000), told=False),
]

# -- provider models (issue 12): what providers document, not what dfbatch assumes ------------
_TOLD_1S = Target(x_bound=1.03, n429=0.005, failed=0, vs="handwritten")
_1S = replace(_SERVER, burst_s=1.0)
_GATEWAY = replace(_SERVER, rpm=150, limit_mode="calendar", burst_s=60.0,
                   calendar_offset_s=30.0, headers="litellm")
PROVIDERS = [
    Scenario("row-tpm-1s", 1000, replace(_1S, tpm=150_000, rpm=600), per_row=True,
             target=_TOLD_1S, columns=("failed",)),
    Scenario("row-tpm-1s-none", 1000, replace(_1S, tpm=150_000, rpm=600, headers="none"),
             per_row=True, target=_TOLD_1S, columns=("failed",)),
    Scenario("row-rpm-1s-none", 600, replace(_1S, rpm=300, tpm=1_000_000, headers="none"),
             mean_tokens=60.0, per_row=True, target=_TOLD_1S, columns=("failed",)),
    Scenario("row-rpm", 600, replace(_SERVER, rpm=120, tpm=1_000_000), mean_tokens=60.0,
             per_row=True, target=Target(x_bound=1.03, n429=0.005, failed=0),
             columns=("failed", "max/10s")),
    Scenario("tpm-1s-none", 2000, replace(_1S, tpm=150_000, rpm=3_000, headers="none"),
             target=_TOLD_1S, columns=("failed",)),
    Scenario("rpm-1s-none", 2000, replace(_1S, rpm=200, tpm=1_000_000, headers="none"),
             mean_tokens=60.0, target=Target(n429=0.005, failed=0, vs_best=0.55),
             columns=("failed",)),
    Scenario("row-blind-1s", 1000, replace(_1S, tpm=150_000, rpm=600, headers="none"),
             per_row=True, told=False, target=Target(x_bound=1.25, n429=0.10, failed=0),
             columns=("failed",)),
    # extra: the same RPM-bound server, nobody told, with no headers / the IETF draft's fields
    Scenario("row-rpm-blind-1s-none", 600, replace(_1S, rpm=300, tpm=1_000_000, headers="none"),
             mean_tokens=60.0, per_row=True, told=False,
             target=Target(x_bound=1.25, n429=0.10, failed=0), columns=("failed",)),
    Scenario("row-rpm-blind-1s-ietf", 600, replace(_1S, rpm=300, tpm=1_000_000, headers="ietf"),
             mean_tokens=60.0, per_row=True, told=False,
             target=Target(x_bound=1.25, n429=0.10, failed=0), columns=("failed",)),
    Scenario("gateway-minute", 600, _GATEWAY, mean_tokens=60.0, per_row=True,
             target=Target(n429=0.005, failed=0), columns=("failed", "max/60s")),
    Scenario("gateway-rpm60", 200, _GATEWAY, mean_tokens=60.0, per_row=True, told_rpm=60.0,
             deadline_s=900.0, target=Target(failed=0, window_rpm=60.0),
             columns=("failed", "max/10s", "max/60s")),
    Scenario("outage", 4000, replace(_SERVER, tpm=150_000, rpm=3_000, outage=(30.0, 20.0)),
             target=Target(failed=0, dead_rps=1.0), columns=("failed", "dead r/s")),
    Scenario("bad-key", 1000, replace(_SERVER, tpm=150_000, rpm=3_000, bad_key=True),
             deadline_s=600.0, target=Target(calls=2 * Knobs().agents), columns=()),
]
SCENARIOS += PROVIDERS

# -- tail scenarios (issue 12 item 5): no binding limit, no server slot cap ------------------
_FREE = replace(_SERVER, max_concurrency=None)
# the baselines that keep the same in-flight cap (32): told no limit, the cookbook sends every
# request at once, which no server without a slot cap would be asked to bear in practice
_CAPPED = ("gather", "aiometer", "seed-rr", "seed-lpt", "handwritten")
TAILS = [
    Scenario("tail-lognormal", 3000, replace(_FREE, sigma=1.0),
             target=Target(vs="gather", vs_x=0.8, hedged=0.05), columns=("hedged",)),
    # calls of ~1.5 s, so the 4 s timeout catches the hangs, not ordinary calls
    Scenario("tail-hangs", 3000, replace(_FREE, p_hang=0.01, per_output_token_s=0.006),
             timeout=4.0, target=Target(vs_best=0.8, among=_CAPPED, failed=0, hedged=0.05),
             columns=("failed", "hedged")),
    Scenario("tail-skewed", 3000, replace(_FREE, per_input_token_s=0.001), skew=0.6,
             oversize=1, target=Target(vs_best=0.9, among=_CAPPED, hedged=0.05),
             columns=("hedged",)),
]
SCENARIOS += TAILS


# -- bounds --------------------------------------------------------------------------------
def _calendar_bound(units: float, per_minute: float, s: SimConfig) -> float:
    """When the last of ``units`` can be admitted by fixed windows (calendar mode)."""
    cap = per_minute * s.burst_s / 60
    last = max(0, math.ceil(units / cap) - 1)  # index of the window that admits the last unit
    return 0.0 if last == 0 else last * s.burst_s - s.calendar_offset_s % s.burst_s


def lower_bound(sc: Scenario, wl: Workload, k: Knobs) -> tuple[float, str]:
    s = sc.server
    if s.bad_key:
        return s.rtt, "one call"
    bad = set(wl.poison) | {i for i in range(wl.n)
                            if s.request_tokens(1, int(wl.tokens[i])) > s.max_request_tokens}
    good = [i for i in range(wl.n) if i not in bad]
    per_request = 1 if sc.per_row else k.items_per_batch
    batches = [[good[j] for j in b] for b in fixed_batches(len(good), per_request)]
    sizes = [(len(b), int(wl.tokens[b].sum())) for b in batches]
    fixed = np.array([s.fixed_latency(n, t) for n, t in sizes])
    lat_min = float(fixed.min()) * s.min_multiplier
    total = sum(s.request_tokens(n, t) for n, t in sizes)
    parts: dict[str, float] = {}
    if s.limit_mode == "calendar":
        for kind, limit, units in (("rpm", s.rpm, len(batches)), ("tpm", s.tpm, total)):
            if limit:
                parts[kind] = _calendar_bound(units, limit, s) + lat_min
    else:
        if s.rpm:
            parts["rpm"] = (max(0.0, len(batches) - s.rpm * s.burst_s / 60) / (s.rpm / 60)
                            + lat_min)
        if s.tpm:
            parts["tpm"] = max(0.0, total - s.tpm * s.burst_s / 60) / (s.tpm / 60) + lat_min
    if s.max_concurrency:  # the server's slots cap every client (the cookbook has no cap)
        parts["work"] = float(fixed.sum()) * s.mean_multiplier() / s.max_concurrency
    if not (s.max_concurrency or s.rpm or s.tpm):  # nothing binds but the clients' in-flight cap
        parts["in flight"] = float(fixed.sum()) * s.mean_multiplier() / k.max_in_flight
    if sc.told_rpm is not None:  # told less than the server allows: that is the bound
        parts["told rpm"] = max(0.0, len(batches) - 1) / (sc.told_rpm / 60) + lat_min
    parts["one call"] = lat_min
    kind = max(parts, key=parts.__getitem__)
    bound = parts[kind]
    if s.outage is not None and bound > s.outage[0]:
        # nothing is served while it is down, but the buckets refill: only the time they sit
        # full is lost (and nothing can end before the server is back)
        start, duration = s.outage
        bound = max(bound + max(0.0, duration - s.burst_s), start + duration + lat_min)
        kind += " + outage"
    return bound, kind


# -- one run -------------------------------------------------------------------------------
@dataclass
class Result:
    makespan: float
    bound: float
    ok: int
    lost: int
    dup: int
    poison_alone: int
    poison: int
    n429: int
    calls: int
    hangs: int
    tokens: int  # charged by the server, all attempts
    cpu_s: float
    stuck: bool = False  # stopped at the deadline (DEADLINE x bound)
    rows: int = 0
    failed: int = 0  # good rows that ended with an error
    metrics: dict[str, float] = field(default_factory=dict)  # the scenario's extra columns


async def _timed(runner: Runner, api: SimAPI, wl: Workload, k: Knobs, seed: int,
                 deadline: float) -> tuple[Sink, float, bool]:
    """Run with a deadline in simulated seconds (a livelocked runner is stopped, not waited
    for: its rows count as lost)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        sink = await asyncio.wait_for(runner(api, wl, k, seed), deadline)
    except TimeoutError:
        return Sink(), loop.time() - t0, True
    return sink, loop.time() - t0, False


def runner_for(sc: Scenario, runner: str, k: Knobs) -> tuple[Runner, Knobs]:
    """The runner and its knobs: per-row scenarios give dfbatch the per-row adapter and the
    baselines one row per request."""
    fn = {**RUNNERS, **VARIANTS}[runner]
    if not sc.per_row:
        return fn, k
    if runner.startswith("dfbatch"):
        return partial(fn, per_row=True), k
    return fn, replace(k, items_per_batch=1)


def run_one(sc: Scenario, runner: str, seed: int, rows_scale: float) -> Result:
    wl = sc.workload(seed, rows_scale)
    k = sc.knobs()
    api = SimAPI(replace(sc.server, seed=seed), wl)
    bound, _ = lower_bound(sc, wl, k)
    fn, k = runner_for(sc, runner, k)
    cpu0 = time.process_time()
    deadline = sc.deadline_s if sc.deadline_s is not None else DEADLINE * bound
    sink, makespan, stuck = run(_timed(fn, api, wl, k, seed, deadline))
    cpu = time.process_time() - cpu0
    result = score(api, wl, sink, makespan, bound, cpu, stuck)
    result.metrics = extra_metrics(sc, api)
    if "hedged" in sc.columns:
        client = api.stats.client
        result.metrics["hedged"] = client["hedged"] / max(1, client["started"])
    return result


def extra_metrics(sc: Scenario, api: SimAPI) -> dict[str, float]:
    """The scenario's extra columns, from the server's call log."""
    starts = [e["t"] for e in api.stats.log]
    out: dict[str, float] = {}
    for name in sc.columns:
        if name == "dead r/s":
            down = [e["t"] for e in api.stats.log if e["outcome"] == "down"]
            out[name] = max_in_sliding_window(down, 1.0)
        elif name.startswith("max/"):
            out[name] = max_in_sliding_window(starts, float(name[4:-1]))
    return out


def score(api: SimAPI, wl: Workload, sink: Sink, makespan: float, bound: float,
          cpu: float, stuck: bool = False) -> Result:
    limit = api.cfg.max_request_tokens
    bad = set(wl.poison) | {i for i in range(wl.n)
                            if api.cfg.request_tokens(1, int(wl.tokens[i])) > limit}
    ok = sum(1 for i in range(wl.n) if i not in bad and sink.outputs.get(i) == expected_output(i))
    good = wl.n - len(bad)
    served_twice = sum(1 for c in api.stats.served.values() if c > 1)
    alone_calls = Counter(e["ids"][0] for e in api.stats.log if len(e["ids"]) == 1)
    alone = sum(1 for p in wl.poison if alone_calls[p] and p in sink.errors)
    failed = sum(1 for i in sink.errors if i not in bad)
    return Result(makespan, bound, ok, good - ok, sink.duplicates + served_twice, alone,
                  len(wl.poison), api.stats.n429, api.stats.calls, api.stats.hangs,
                  api.stats.tokens_charged, cpu, stuck, wl.n, failed)


# -- tables --------------------------------------------------------------------------------
@dataclass
class Row:
    runner: str
    results: list[Result] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return statistics.median(r.makespan for r in self.results)

    @property
    def lost(self) -> int:
        return max(r.lost for r in self.results)

    @property
    def ratio(self) -> float:
        return statistics.median(r.makespan / r.bound for r in self.results)

    @property
    def frac429(self) -> float:
        return statistics.median(r.n429 / max(1, r.calls) for r in self.results)

    @property
    def failed(self) -> int:
        return max(r.failed for r in self.results)

    def metric(self, name: str) -> float:
        """A scenario column, worst (largest) over seeds."""
        return max(r.metrics.get(name, 0.0) for r in self.results)

    def cell(self, columns: tuple[str, ...] = ()) -> str:
        rs = self.results
        ratio = statistics.median(r.makespan / r.bound for r in rs)
        worst = min(rs, key=lambda r: r.ok)
        med = lambda f: int(statistics.median(f(r) for r in rs))  # noqa: E731
        poison = f"{min(r.poison_alone for r in rs)}/{worst.poison}" if worst.poison else "-"
        stuck = sum(r.stuck for r in rs)
        note = f"  STOPPED at the deadline in {stuck}/{len(rs)} seeds" if stuck else ""
        return (f"{self.runner:<13} {self.makespan:9.1f} {ratio:8.3f} {worst.ok:6d} "
                f"{self.lost:5d} {max(r.dup for r in rs):4d} {poison:>7} "
                f"{med(lambda r: r.n429):6d} {med(lambda r: r.calls):6d} "
                f"{med(lambda r: r.tokens) / 1000:8.0f} {sum(r.cpu_s for r in rs):6.1f} "
                f"{self.frac429:8.1%} {statistics.median(r.calls / r.rows for r in rs):9.2f}"
                + "".join(f" {self._extra(c):>8}" for c in columns) + note)

    def _extra(self, name: str) -> str:
        if name == "failed":
            return str(self.failed)
        if name == "hedged":
            return f"{self.metric(name):.1%}"
        return f"{self.metric(name):g}"


def header(columns: tuple[str, ...] = ()) -> str:
    return (f"{'runner':<13} {'makespan':>9} {'x bound':>8} {'ok':>6} {'lost':>5} {'dup':>4} "
            f"{'poison':>7} {'429s':>6} {'calls':>6} {'ktokens':>8} {'cpu s':>6} "
            f"{'429/req':>8} {'calls/row':>9}" + "".join(f" {c:>8}" for c in columns))


HEADER = header()


def best_baseline(rows: dict[str, Row]) -> Row | None:
    base = [r for name, r in rows.items() if not name.startswith("dfbatch")]
    return min(base, key=lambda r: (r.lost, r.makespan)) if base else None


def verdicts(sc: Scenario, rows: dict[str, Row]) -> list[str]:
    """One line per dfbatch row: PASS / FAIL against the scenario's target, and why."""
    t = sc.target
    if t is None:
        return []
    best = best_baseline({n: r for n, r in rows.items() if not t.among or n in t.among})
    lines = [f"target (dfbatch, defaults): {t.text()}"]
    for name, row in rows.items():
        if not name.startswith("dfbatch"):
            continue
        misses = []
        if t.x_bound is not None and row.ratio > t.x_bound:
            misses.append(f"{row.ratio:.3f}x bound")
        if t.n429 is not None and row.frac429 > t.n429:
            misses.append(f"429s {row.frac429:.1%}")
        if t.failed is not None and row.failed > t.failed:
            misses.append(f"{row.failed} rows failed")
        if t.dead_rps is not None and row.metric("dead r/s") > t.dead_rps:
            misses.append(f"{row.metric('dead r/s'):g} req/s to the dead server")
        calls = max(r.calls for r in row.results)
        if t.calls is not None and calls > t.calls:
            misses.append(f"{calls} calls")
        if t.vs_best is not None and best is not None:
            if row.makespan > t.vs_best * best.makespan:
                misses.append(f"{row.makespan / best.makespan:.3f}x {best.runner}")
        tied = ""
        if t.vs is not None and t.vs in rows:
            # "at least as good as": a tie (same makespan to 0.1%, e.g. both at the bound) is
            ratio = row.makespan / rows[t.vs].makespan  # not a miss, and is said to be a tie
            if ratio > t.vs_x * (1 + TIE):
                misses.append(f"{ratio:.3f}x {t.vs}")
            elif abs(ratio - t.vs_x) <= t.vs_x * TIE:
                tied = f" (tied: {ratio:.3f}x {t.vs})"
        if t.hedged is not None and row.metric("hedged") > t.hedged:
            misses.append(f"hedges {row.metric('hedged'):.1%} of calls")
        if t.window_rpm is not None:
            for c in (c for c in sc.columns if c.startswith("max/")):
                cap = t.window_rpm * float(c[4:-1]) / 60 + 1
                if row.metric(c) > cap:
                    misses.append(f"{row.metric(c):g} requests in {c[4:]} (cap {cap:g})")
        verdict = "PASS" + tied if not misses else "FAIL: " + ", ".join(misses)
        lines.append(f"  {name}: {verdict}")
    return lines


def runner_names(sc: Scenario, runners: list[str]) -> list[str]:
    """``runners`` with the scenario's extra dfbatch variants after the last dfbatch row."""
    at = max((i + 1 for i, r in enumerate(runners) if r.startswith("dfbatch")), default=0)
    extra = list(sc.extra_runners) if at else []
    return [*runners[:at], *extra, *runners[at:]]


def submit(pool: Executor, sc: Scenario, runners: list[str], seeds: int, rows_scale: float
           ) -> dict[str, list[Future[Result]]]:
    """Every (runner, seed) run of one scenario, as futures (runs are independent)."""
    return {r: [pool.submit(run_one, sc, r, seed, rows_scale) for seed in range(seeds)]
            for r in runner_names(sc, runners)}


def collect(futures: dict[str, list[Future[Result]]]) -> dict[str, Row]:
    return {r: Row(r, [f.result() for f in fs]) for r, fs in futures.items()}


def headline(rows: dict[str, Row]) -> str:
    best = best_baseline(rows)  # lost no row, else the fewest
    if best is None:
        return ""
    label = best.runner if best.lost == 0 else f"{best.runner}, which lost {best.lost} rows"
    parts = [f"{name} / best baseline ({label}) = {r.makespan / best.makespan:.3f}"
             for name, r in rows.items() if name.startswith("dfbatch")]
    return "; ".join(parts)


def describe(sc: Scenario, rows_scale: float) -> str:
    wl = sc.workload(0, rows_scale)
    k = sc.knobs()
    bound, kind = lower_bound(sc, wl, k)
    s = sc.server
    limits = ", ".join(f"{n}={v:g}" for n, v in (("rpm", s.rpm), ("tpm", s.tpm)) if v) or "none"
    window = "calendar window" if s.limit_mode == "calendar" else "bucket"
    told = "" if sc.told else ", not told"
    told = f", told rpm={sc.told_rpm:g}" if sc.told_rpm is not None else told
    limits += f" ({window} {s.burst_s:g} s, headers {s.headers}{told})"
    extra = "".join(f", {x}" for x, on in (("per-row fn", sc.per_row), ("bad key", s.bad_key),
                                            (f"outage {s.outage}", s.outage)) if on)
    return (f"== {sc.name}: {wl.n} rows, limits {limits}, server slots "
            f"{s.max_concurrency or 'unlimited'}{extra}; lower bound (seed 0) {bound:.1f} s "
            f"[{kind}]")


def trace(sc: Scenario, rows_scale: float) -> None:
    """Print dfbatch's event counts and a coarse timeline per 10 s (seed 0): calls started,
    their tokens and rows per call, calls ended, hedges sent."""
    wl = sc.workload(0, rows_scale)
    k = sc.knobs()
    api = SimAPI(replace(sc.server, seed=0), wl)
    events: list[Any] = []

    async def go() -> Sink:
        return await run_dfbatch(api, wl, k, 0, on_event=events.append, per_row=sc.per_row)

    run(go())
    print(Counter(type(e).__name__ for e in events))
    t0 = events[0].t
    starts = Counter(int((e.t - t0) // 10) for e in events if type(e).__name__ == "BatchStarted")
    tokens: Counter[int] = Counter()
    rows: dict[int, list[int]] = {}  # rows of each call started in the window
    hedges = Counter(int((e.t - t0) // 10) for e in events if type(e).__name__ == "BatchHedged")
    ends = Counter(int((e.t - t0) // 10) for e in events
                   if type(e).__name__ in ("BatchFinished", "BatchFailed"))
    for e in events:
        if type(e).__name__ == "BatchStarted":
            tokens[int((e.t - t0) // 10)] += e.tokens
            rows.setdefault(int((e.t - t0) // 10), []).append(e.rows)
    for b in sorted(starts.keys() | ends.keys()):
        r = rows.get(b, [0])
        print(f"  t={b * 10:4d}-{b * 10 + 10:<4d} starts {starts[b]:4d} tokens {tokens[b]:7d} "
              f"rows/call {statistics.mean(r):5.1f} (max {max(r):3d}) ends {ends[b]:4d} "
              f"hedged {hedges[b]:3d}")
    print(f"  makespan {events[-1].t - t0:.1f} s")
    print(f"  429s {api.stats.n429}, calls {api.stats.calls}, server peak {api.max_in_service}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default="", help="scenario names, comma-separated; "
                   "'providers' = every provider model")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--rows", type=float, default=1.0, help="scale the scenarios' row counts")
    p.add_argument("--trace", default="", help="print dfbatch's timeline for one scenario")
    p.add_argument("--jobs", type=int, default=cpu_cores(), help="processes (default: cores)")
    a = p.parse_args(argv)
    only = set(a.only.split(",")) if a.only else set()
    if "providers" in only:  # the provider models of issue 12
        only |= {s.name for s in PROVIDERS}
    if "tails" in only:  # the tail scenarios of issue 12
        only |= {s.name for s in TAILS}
    picked = [s for s in SCENARIOS if not only or s.name in only]
    if a.trace:
        trace(next(s for s in SCENARIOS if s.name == a.trace), a.rows)
        return
    runners = a.runners.split(",")
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("fork") if a.jobs > 1 else None
    with ProcessPoolExecutor(a.jobs, mp_context=ctx) if ctx else _Inline() as pool:
        pending = [(sc, submit(pool, sc, runners, a.seeds, a.rows)) for sc in picked]
        for sc, futures in pending:
            rows = collect(futures)
            print(describe(sc, a.rows))
            print(header(sc.columns))
            for r in rows.values():
                print(r.cell(sc.columns))
            print(headline(rows))
            for line in verdicts(sc, rows):
                print(line)
            print(flush=True)
    print(f"({a.seeds} seeds, {a.jobs} processes, wall {time.perf_counter() - t0:.0f} s)")


class _Inline(Executor):
    """Runs each submitted call at once, in this process (``--jobs 1``: easier to profile)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


if __name__ == "__main__":
    main()
