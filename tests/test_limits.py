"""Rate limits hold in every window, adaptive concurrency backs off and recovers, retry-after holds.

The runs use ``dfbatch.aprocess`` on ``benchmarks.simapi.VirtualClockLoop`` (simulated time: a
minute of rate limiting takes a fraction of a second and start times are exact), with spy APIs
that record when each call started and ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pytest

import dfbatch
from benchmarks.simapi import SimAPI, SimConfig, SimError, Workload, run
from dfbatch.config import BatchConfig

BURST_MIN = getattr(BatchConfig(), "rate_burst", 0.1)  # minutes of rate a bucket holds


def _frame(wl: Workload) -> tuple[pl.DataFrame, Callable[[list[str]], list[int]]]:
    texts = wl.texts()
    lookup = dict(zip(texts, wl.tokens.tolist(), strict=True))
    return pl.DataFrame({"id": range(wl.n), "text": texts}), lambda ts: [lookup[t] for t in ts]


def _process(df: pl.DataFrame, fn: Any, **settings: Any) -> pl.DataFrame:
    settings = {"backoff_base": 0.01, "backoff_max": 0.1, "progress": False, **settings}
    return run(dfbatch.aprocess(df, fn, **settings))


def _worst_window(t: np.ndarray, units: np.ndarray, rate: float, burst: float) -> float:
    """max over windows [t_i, t_j] of sent units - (burst + rate * (t_j - t_i)) (<= 0: ok)."""
    order = np.argsort(t, kind="stable")
    t, units = t[order], units[order]
    cum = np.concatenate([[0.0], np.cumsum(units)])
    i, j = np.triu_indices(len(t))
    sent = cum[j + 1] - cum[i]
    return float((sent - burst - rate * (t[j] - t[i])).max())


@pytest.mark.parametrize(("rpm", "tpm"), [(600, 30_000), (120, 1_000_000)],
                         ids=["tpm-binds", "rpm-binds"])
def test_rate_limits_never_exceeded_in_any_window(rpm: float, tpm: float) -> None:
    wl = Workload.make(600, mean_tokens=100, seed=1)
    api = SimAPI(SimConfig(base_latency=0.3, per_output_token_s=0.0, sigma=0.6), wl)
    df, encoding = _frame(wl)

    async def fn(batch: pl.DataFrame) -> list[str]:
        return (await api.call(batch["id"].to_list())).outputs  # a spy: no limits, no headers

    out = _process(df, fn, encoding=encoding, agents=3, rpm=rpm, tpm=tpm)
    assert out["error"].is_null().all()
    t = np.array([c["t"] for c in api.stats.log])
    tokens = np.array([c["tokens"] for c in api.stats.log], dtype=float)
    for per_min, units in ((rpm, np.ones_like(t)), (tpm, tokens)):
        rate, burst = per_min / 60, per_min * BURST_MIN
        assert _worst_window(t, units, rate, burst) <= 1e-6 * burst
    # the limit did bind: the run took about as long as the binding bucket allows
    need = max((len(t) - rpm * BURST_MIN) / (rpm / 60),
               (tokens.sum() - tpm * BURST_MIN) / (tpm / 60))
    assert t.max() >= 0.95 * need


class PhasedAPI:
    """Answers in ``latency`` s; calls that start in ``[bad_from, bad_until)`` get a 429."""

    def __init__(self, latency: float, bad: list[tuple[float, float]], retry_after: float):
        self.latency, self.bad, self.retry_after = latency, bad, retry_after
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.samples: list[tuple[float, int]] = []  # (time, calls in flight) at every start

    async def __call__(self, batch: pl.DataFrame) -> list[int]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        call: dict[str, Any] = {"t": start, "end": None, "ok": True}
        self.calls.append(call)
        self.in_flight += 1
        self.samples.append((start, self.in_flight))
        try:
            await asyncio.sleep(self.latency)
            if any(a <= start < b for a, b in self.bad):
                call["ok"] = False
                msg = "rate limit reached"
                raise SimError(429, msg, retry_after=self.retry_after)
            return [0] * batch.height
        finally:
            self.in_flight -= 1
            call["end"] = loop.time()


def _peak(samples: list[tuple[float, int]], start: float, end: float) -> int:
    return max((n for t, n in samples if start <= t < end), default=0)


def test_concurrency_drops_after_429s_then_grows_back() -> None:
    api = PhasedAPI(latency=0.1, bad=[(1.0, 1.5)], retry_after=0.02)
    df = pl.DataFrame({"text": ["x"] * 6000})
    out = _process(df, api, encoding=lambda ts: [1] * len(ts), agents=4,
                   max_concurrent_batches=8, max_in_flight=32, max_attempts=50)
    assert out["error"].is_null().all()  # every row made it through the 429 phase
    s = api.samples
    assert _peak(s, 0.0, 1.0) == 32  # before: the cap
    assert _peak(s, 1.6, 1.9) <= 8  # right after the 429 phase: far fewer calls in flight
    end = max(c["end"] for c in api.calls)
    # and back up with the successes (additive increase); with no limit told, the rate the
    # server answered during the 429s also paces the sends for a while (regrowing slowly)
    assert _peak(s, 2.5, end - 0.2) >= 2 * _peak(s, 1.6, 1.9)


def _starts_during(calls: list[dict[str, Any]], pauses: list[tuple[float, float]]) -> list[float]:
    return [c["t"] for c in calls for a, b in pauses if a + 1e-6 < c["t"] < b - 1e-6]


def _pause_run(cap: int) -> PhasedAPI:
    """Calls that start in five 20 ms windows get a 429 with retry_after 0.3 s."""
    api = PhasedAPI(latency=0.05, bad=[(x, x + 0.02) for x in (0.5, 1.0, 1.5, 2.0, 2.5)],
                    retry_after=0.3)
    out = _process(pl.DataFrame({"text": ["x"] * 4000}), api, encoding=lambda ts: [1] * len(ts),
                   agents=4, max_concurrent_batches=cap // 4, max_in_flight=cap, max_attempts=20)
    assert out["error"].is_null().all()
    assert sum(not c["ok"] for c in api.calls) >= 5, "the spy should have sent some 429s"
    return api


def _pauses(api: PhasedAPI) -> list[tuple[float, float]]:
    return [(c["end"], c["end"] + api.retry_after) for c in api.calls if not c["ok"]]


def test_no_call_starts_before_a_429s_retry_after_is_over() -> None:
    api = _pause_run(cap=8)  # the adaptive limit never falls below the calls waiting for it
    assert _starts_during(api.calls, _pauses(api)) == []


def test_retry_after_holds_for_batches_already_waiting_for_a_slot() -> None:
    api = _pause_run(cap=16)  # after a halving, batches queue on the adaptive slots
    assert _starts_during(api.calls, _pauses(api)) == []


def test_a_failed_all_or_none_try_gives_a_rate_bucket_back_what_it_took() -> None:
    from dfbatch.execute._limits import Cost, Limits
    from dfbatch.execute._rate import RateLimit

    async def main() -> tuple[float, float, bool]:
        rpm = RateLimit(600, burst=0.02)  # 10 requests/s, a bucket of 10
        tpm = RateLimit(60_000, tokens=True, burst=0.001)  # 1,000 tokens/s, a bucket of 60
        stack = Limits([rpm, tpm])
        assert stack.try_acquire(Cost(tokens=10))
        before = rpm.level
        took = stack.try_acquire(Cost(tokens=1_000))  # the TPM bucket cannot pay: nothing taken
        return before, rpm.level, took

    before, after, took = asyncio.run(main())
    assert not took and after == pytest.approx(before, abs=0.01)


def test_an_unknown_limit_logs_its_charges_per_10ms_a_known_one_each() -> None:
    """A fast run charges an unknown limit thousands of times a second: its log (read only for
    rates over seconds) keeps one entry per 10 ms, the units summed; a known one logs each."""
    from dfbatch.execute._journal import ChargeLog
    from dfbatch.execute._limits import Cost, Outcome
    from dfbatch.execute._rate import RateLimit

    log = ChargeLog()
    for i in range(1000):
        log.add(i * 0.001, 2.0, 15.0, 0.01)
        assert log.mine() is not None and log.mine()[0] <= i * 0.001  # type: ignore[index]
    assert len(log) <= 101 and sum(u for _, u in log.after_mine()) == 0.0
    assert 1990.0 <= sum(log._units) <= 2000.0  # (every unit kept; the oldest may be pruned)

    async def charge() -> tuple[int, int]:
        unknown, known = RateLimit(None), RateLimit(60_000, burst=1.0)
        for _ in range(500):
            assert unknown.try_acquire(Cost()) and known.try_acquire(Cost())
            unknown.release(Cost(), Outcome(True))
        return len(unknown.log) + len(unknown._guess._times), len(known.log)

    small, every = run(charge())  # (virtual clock: it stands still, so no 10 ms boundary is
    assert small == 2 and every == 500  # crossed, however loaded the machine: one entry)
