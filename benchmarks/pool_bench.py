"""dfbatch versus what users write by hand, against a simulated rate-limited API.

Run: ``.venv/bin/python benchmarks/pool_bench.py`` (all scenarios, 3 seeds; ~90 s of CPU, spread
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

Columns: makespan (median over seeds, simulated s), x bound (median makespan / bound), ok /
lost / dup (good rows answered correctly, good rows without their answer, rows answered more
than once -- worst seed), poison alone (poison rows whose last call held only that row, worst
seed), 429s, calls and ktokens (tokens the server charged, all attempts; median), cpu s (CPU
seconds of all seeds' runs). The headline compares each dfbatch row with the fastest baseline
that lost no row (if every baseline lost rows: the one that lost the fewest).

``dfbatch`` runs with its defaults; ``dfbatch+`` with ``rate_burst=1.0`` (a minute's burst, like
the provider's bucket) and ``dynamic_batching=True``; ``dfbatch-hedge`` (latency only) with
``hedge_after=0.9``. Settings this dfbatch does not know are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from benchmarks.simapi import SimAPI, SimConfig, Workload, expected_output, run
from dfbatch.config import cpu_cores

OVERSIZE_TOKENS = 40_000
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


async def run_dfbatch(api: SimAPI, wl: Workload, k: Knobs, seed: int,
                      on_event: Callable[[Any], None] | None = None, **extra: Any) -> Sink:
    df, encoding = frame_of(wl)
    known = {f.name for f in dataclasses.fields(dfbatch.BatchConfig)}
    settings = {**dfbatch_settings(k, seed), **{n: v for n, v in extra.items() if n in known}}
    out = await dfbatch.aprocess(df, api_fn(api), text="text", encoding=encoding,
                                 on_event=on_event, **settings)
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

    def workload(self, seed: int, rows_scale: float) -> Workload:
        n = max(40, round(self.rows * rows_scale))
        over = [n // 3] if self.oversize else []
        return Workload.make(n, mean_tokens=self.mean_tokens, seed=seed, skew=self.skew,
                             poison_frac=self.poison_frac, oversize=over,
                             oversize_tokens=OVERSIZE_TOKENS)

    def knobs(self) -> Knobs:
        s = self.server
        rpm, tpm = (s.rpm, s.tpm) if self.told else (None, None)
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


# -- bounds --------------------------------------------------------------------------------
def lower_bound(sc: Scenario, wl: Workload, k: Knobs) -> tuple[float, str]:
    s = sc.server
    bad = set(wl.poison) | {i for i in range(wl.n)
                            if s.request_tokens(1, int(wl.tokens[i])) > s.max_request_tokens}
    good = [i for i in range(wl.n) if i not in bad]
    batches = [[good[j] for j in b] for b in fixed_batches(len(good), k.items_per_batch)]
    sizes = [(len(b), int(wl.tokens[b].sum())) for b in batches]
    fixed = np.array([s.fixed_latency(n, t) for n, t in sizes])
    lat_min = float(fixed.min()) * s.min_multiplier
    parts: dict[str, float] = {}
    if s.rpm:
        parts["rpm"] = max(0.0, len(batches) - s.rpm * s.burst_s / 60) / (s.rpm / 60) + lat_min
    if s.tpm:
        total = sum(s.request_tokens(n, t) for n, t in sizes)
        parts["tpm"] = max(0.0, total - s.tpm * s.burst_s / 60) / (s.tpm / 60) + lat_min
    if s.max_concurrency:  # the server's slots cap every client (the cookbook has no cap)
        parts["work"] = float(fixed.sum()) * s.mean_multiplier() / s.max_concurrency
    parts["one call"] = lat_min
    kind = max(parts, key=parts.__getitem__)
    return parts[kind], kind


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


def run_one(sc: Scenario, runner: str, seed: int, rows_scale: float) -> Result:
    wl = sc.workload(seed, rows_scale)
    k = sc.knobs()
    api = SimAPI(replace(sc.server, seed=seed), wl)
    bound, _ = lower_bound(sc, wl, k)
    cpu0 = time.process_time()
    fn = {**RUNNERS, **VARIANTS}[runner]
    sink, makespan, stuck = run(_timed(fn, api, wl, k, seed, DEADLINE * bound))
    cpu = time.process_time() - cpu0
    return score(api, wl, sink, makespan, bound, cpu, stuck)


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
    return Result(makespan, bound, ok, good - ok, sink.duplicates + served_twice, alone,
                  len(wl.poison), api.stats.n429, api.stats.calls, api.stats.hangs,
                  api.stats.tokens_charged, cpu, stuck)


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

    def cell(self) -> str:
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
                f"{med(lambda r: r.tokens) / 1000:8.0f} {sum(r.cpu_s for r in rs):6.1f}{note}")


HEADER = (f"{'runner':<13} {'makespan':>9} {'x bound':>8} {'ok':>6} {'lost':>5} {'dup':>4} "
          f"{'poison':>7} {'429s':>6} {'calls':>6} {'ktokens':>8} {'cpu s':>6}")


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
    base = [r for name, r in rows.items() if not name.startswith("dfbatch")]
    if not base:
        return ""
    best = min(base, key=lambda r: (r.lost, r.makespan))  # lost no row, else the fewest
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
    limits += f" (bucket {s.burst_s:g} s{'' if sc.told else ', not told'})"
    return (f"== {sc.name}: {wl.n} rows, limits {limits}, server slots "
            f"{s.max_concurrency or 'unlimited'}; lower bound (seed 0) {bound:.1f} s [{kind}]")


def trace(sc: Scenario, rows_scale: float) -> None:
    """Print dfbatch's event counts and a coarse timeline of starts per 10 s (seed 0)."""
    wl = sc.workload(0, rows_scale)
    k = sc.knobs()
    api = SimAPI(replace(sc.server, seed=0), wl)
    events: list[Any] = []

    async def go() -> Sink:
        return await run_dfbatch(api, wl, k, 0, on_event=events.append)

    run(go())
    print(Counter(type(e).__name__ for e in events))
    t0 = events[0].t
    starts = Counter(int((e.t - t0) // 10) for e in events if type(e).__name__ == "BatchStarted")
    tokens: Counter[int] = Counter()
    for e in events:
        if type(e).__name__ == "BatchStarted":
            tokens[int((e.t - t0) // 10)] += e.tokens
    for b in sorted(starts):
        print(f"  t={b * 10:4d}-{b * 10 + 10:<4d} starts {starts[b]:4d} tokens {tokens[b]:7d}")
    print(f"  429s {api.stats.n429}, calls {api.stats.calls}, server peak {api.max_in_service}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", default="")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--rows", type=float, default=1.0, help="scale the scenarios' row counts")
    p.add_argument("--trace", default="", help="print dfbatch's timeline for one scenario")
    p.add_argument("--jobs", type=int, default=cpu_cores(), help="processes (default: cores)")
    a = p.parse_args(argv)
    picked = [s for s in SCENARIOS if not a.only or s.name in a.only.split(",")]
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
            print(HEADER)
            for r in rows.values():
                print(r.cell())
            print(headline(rows))
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
