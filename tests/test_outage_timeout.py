"""``outage_timeout`` stops a run on time: no answer for that long stops it even while every
call sleeps out a long Retry-After, a retry's backoff, a probe's wait or hangs in flight.

The breaker arms a timer when the stall begins (``Breaker.stalled``); its sleeps end when it
stops; the pool stops the run at once. Virtual clock (``benchmarks.simapi.run``) unless a
server or a checkpoint is involved.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest

import dfbatch
from benchmarks.simapi import run
from dfbatch.errors import NoProgressError, RunStoppedError
from dfbatch.execute._breaker import Breaker
from dfbatch.execute._limits import Cost, Outcome
from dfbatch.execute._pause import PauseGate

QUIET: dict[str, Any] = {"progress": False, "encoding": lambda ts: [5] * len(ts)}


def now() -> float:
    return asyncio.get_running_loop().time()


class Refused(Exception):
    """A 429 whose Retry-After is long (a spent daily quota says an hour)."""

    status_code = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__("429 Too Many Requests")
        self.headers = {"retry-after": str(retry_after)}


# -- the breaker: a timer, sleeps that end, listeners ----------------------------------------
def test_the_stall_ends_the_run_on_time_though_no_call_fails_again():
    async def main() -> tuple[float, BaseException | None]:
        breaker = Breaker(give_up_s=10.0)
        breaker.stalled("rate_limit")  # t = 0: the first 429 since an answer
        t0 = now()
        try:
            await breaker.sleep(3600.0)  # a Retry-After of an hour
        except NoProgressError as exc:
            return now() - t0, exc
        return now() - t0, None

    waited, exc = run(main())
    assert waited == pytest.approx(10.0)  # (it slept the hour, then looked)
    assert isinstance(exc, NoProgressError) and exc.cause == "rate_limit"
    assert "outage_timeout=10" in str(exc)


def test_an_answer_disarms_the_timer():
    async def main() -> BaseException | None:
        breaker = Breaker(give_up_s=10.0)
        breaker.stalled("outage")
        await asyncio.sleep(9.0)
        breaker.record(await breaker.wait(), "ok")
        await asyncio.sleep(100.0)
        return breaker.stopped

    assert run(main()) is None


def test_a_stop_ends_the_probe_wait_and_tells_listeners_once():
    async def main() -> tuple[float, list[str], list[str]]:
        breaker = Breaker(threshold=1, first_s=1000.0)
        breaker.record(await breaker.wait(), "outage")  # open: the next probe in 1000 s
        heard: list[str] = []
        unlisten = breaker.listen(lambda exc: heard.append(str(exc)))
        late: list[str] = []
        gone = breaker.listen(lambda exc: late.append(str(exc)))
        gone()
        waiter = asyncio.create_task(breaker.wait())
        await asyncio.sleep(5.0)
        breaker.stop(RuntimeError("key refused"))
        breaker.stop(RuntimeError("again"))  # (the first stop is the one)
        t0 = now()
        with pytest.raises(RuntimeError, match="key refused"):
            await waiter
        unlisten()
        return now() - t0, heard, late

    waited, heard, late = run(main())
    assert waited < 1e-6 and heard == ["key refused"] and late == []


def test_a_stopped_breaker_ends_a_long_pause_at_once():
    async def main() -> tuple[float, BaseException]:
        breaker = Breaker(give_up_s=2.0)
        gate = PauseGate(breaker=breaker)
        await gate.acquire(Cost())
        gate.release(Cost(), Outcome(ok=False, rate_limited=True, retry_after=3600.0))
        t0 = now()
        try:
            await gate.acquire(Cost())
        except NoProgressError as exc:
            return now() - t0, exc
        msg = "the pause was sat out"
        raise AssertionError(msg)

    waited, exc = run(main())
    assert waited == pytest.approx(2.0) and "rate-limit 429" in str(exc)


# -- whole runs --------------------------------------------------------------------------------
def _refusing_after(n_ok: int, failure: Any) -> tuple[Any, dict[str, Any]]:
    seen: dict[str, Any] = {"calls": 0, "stall": None}

    async def fn(batch: pl.DataFrame) -> list[str]:
        seen["calls"] += 1
        if seen["calls"] > n_ok:
            if seen["stall"] is None:
                seen["stall"] = now()
            await failure(seen["calls"])
        return [t.upper() for t in batch["text"]]

    return fn, seen


def _stopped_run(fn: Any, **opts: Any) -> tuple[float, RunStoppedError]:
    df = pl.DataFrame({"text": [f"r{i}" for i in range(40)]})

    async def main() -> tuple[float, RunStoppedError]:
        try:
            await dfbatch.aprocess(df, fn, **{**QUIET, **opts})
        except RunStoppedError as exc:
            return now(), exc
        msg = "the run was not stopped"
        raise AssertionError(msg)

    return run(main())


@pytest.mark.parametrize("retry_after", [8.0, 3600.0])
def test_a_long_retry_after_does_not_outlast_outage_timeout(retry_after: float):
    async def refuse(call: int) -> None:
        raise Refused(retry_after)

    fn, seen = _refusing_after(3, refuse)
    t_end, exc = _stopped_run(fn, items_per_batch=4, max_concurrent_batches=2,
                              outage_timeout=2.0, max_attempts=50)
    # it slept out the whole Retry-After (the run's pause, then the retry's backoff) first
    assert t_end - seen["stall"] == pytest.approx(2.0, abs=0.05)
    assert "outage_timeout" in str(exc) and "rate-limit 429" in str(exc)
    partial = exc.partial
    assert isinstance(partial, pl.DataFrame) and partial.height == 40
    done = partial.filter(pl.col("output").is_not_null())
    assert done.height == 12  # the three answered batches, and only they
    assert (done["output"] == done["text"].str.to_uppercase()).all()
    assert partial.filter(pl.col("output").is_null())["error"].eq("cancelled").all()


def test_calls_hanging_in_flight_do_not_hold_a_stopped_run():
    async def dead_or_hung(call: int) -> None:
        if call % 2:
            msg = "connection refused"
            raise ConnectionError(msg)
        await asyncio.sleep(3600.0)  # no timeout: it would hang for an hour

    fn, seen = _refusing_after(2, dead_or_hung)
    t_end, exc = _stopped_run(fn, items_per_batch=4, max_concurrent_batches=2,
                              outage_timeout=5.0, max_attempts=1000, timeout=None)
    assert t_end - seen["stall"] == pytest.approx(5.0, abs=0.05)
    assert "unreachable" in str(exc)
    assert isinstance(exc.partial, pl.DataFrame)
    assert exc.partial["output"].is_not_null().sum() == 8


class _Quota:
    """A provider whose quota is spent after ``left`` calls (each later call: a 429 saying a
    minute), until it is renewed; remembers the rows it answered. Its state differs between
    runs, not its outputs: it declares its identity so that resuming is allowed."""

    dfbatch_fingerprint: ClassVar[dict[str, str]] = {"fn": "_Quota"}

    def __init__(self, left: int) -> None:
        self.left = left
        self.rows: list[int] = []

    def __call__(self, batch: pl.DataFrame) -> list[str]:
        if self.left <= 0:
            raise Refused(60.0)
        self.left -= 1
        self.rows.append(batch.height)
        return [t.upper() for t in batch["text"]]


def test_a_run_stopped_by_outage_timeout_resumes_from_its_checkpoint(tmp_path: Path):
    df = pl.DataFrame({"text": [f"r{i}" for i in range(40)]})
    fn = _Quota(3)
    opts = {**QUIET, "items_per_batch": 4, "max_concurrent_batches": 1, "agents": 1,
            "checkpoint": tmp_path, "outage_timeout": 0.3}
    t0 = time.monotonic()
    with pytest.raises(RunStoppedError) as info:
        dfbatch.process(df, fn, **opts)
    assert time.monotonic() - t0 < 30.0  # (it sat out the minute's pause first)
    assert info.value.partial["output"].is_not_null().sum() == 12  # type: ignore[index]
    fn.left, fn.rows = 10**6, []  # the quota is renewed
    out = dfbatch.process(df, fn, **opts)
    assert sum(fn.rows) == 28  # only the rows the stopped run left unfinished
    assert out["output"].to_list() == [t.upper() for t in df["text"]]


def test_a_gateway_that_says_retry_after_60_stops_after_outage_timeout(make_sim: Any):
    from dfbatch.llm import chat

    # every request refused; LiteLLM's router hints the window's length (60 s) with each 429
    # (real seconds: time_scale=1); the run stops about outage_timeout after the first 429
    server = make_sim(rpm=0.001, headers="litellm", time_scale=1.0)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=8, base_url=server.url,
              api_key="sk-test")
    df = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
    t0 = time.monotonic()
    with pytest.raises(RunStoppedError) as info:
        df.batch.process(fn, progress=False, outage_timeout=1.0, timeout=5.0)
    elapsed = time.monotonic() - t0
    assert "rate-limit 429" in str(info.value) and "outage_timeout" in str(info.value)
    assert elapsed < 20.0
    partial = info.value.partial
    assert isinstance(partial, pl.DataFrame) and partial["output"].is_null().all()


# -- the Ray engine, without Ray: its driver and actors in this process -----------------------
class _Handle:
    """An in-process stand-in for an agent actor's handle: ``run.remote`` streams refs."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.run = self  # handle.run.remote(...)

    async def remote(self, meta: Any, wire: Any) -> Any:
        async for item in self.actor.run(meta, wire):
            yield _ref(item)


async def _ref(item: Any) -> Any:
    return item


class _InProcessGang:
    def __init__(self, fn: Any, cfg: Any, reserved: set[str], n: int) -> None:
        from dfbatch.engines.actor import AgentActor

        self.handles = [_Handle(AgentActor(fn, cfg, reserved, None, f"agent{a}", n))
                        for a in range(n)]

    def agent(self, a: int) -> Any:
        return self.handles[a]

    def close(self) -> None:
        pass


def _in_process_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine="ray"`` runs the Ray engine's driver (``RayCaller``) and its actors'
    ``AgentActor`` here, on this loop (only the transport is not Ray's)."""
    import types

    import dfbatch.engines
    from dfbatch.engines import ray as ray_engine

    class Caller(ray_engine.RayCaller):
        async def open(self) -> None:
            self.gang = _InProcessGang(self.fn, self.cfg, self.reserved,  # type: ignore[assignment]
                                       len(self.limits.agent_slots))

    class Engine(ray_engine.RayEngine):
        def caller(self, fn: Any, cfg: Any, limits: Any, report: Any, *, reserved: set[str],
                   queued: Any) -> Any:
            return Caller(fn, cfg, limits, report, reserved=reserved)

    fake = types.SimpleNamespace(RayEngine=Engine, configure=lambda cfg, address: cfg)
    monkeypatch.setattr(dfbatch.engines, "load_ray", lambda: fake)


@pytest.mark.parametrize("failure", ["dead", "429"])
def test_the_ray_engine_stops_a_run_with_no_answer_after_outage_timeout(
        monkeypatch: pytest.MonkeyPatch, failure: str):
    _in_process_ray(monkeypatch)

    async def fail(call: int) -> None:
        if failure == "429":
            raise Refused(3600.0)
        msg = "connection refused"
        raise ConnectionError(msg)

    fn, seen = _refusing_after(3, fail)
    t_end, exc = _stopped_run(fn, engine="ray", agents=2, items_per_batch=4,
                              max_concurrent_batches=2, outage_timeout=5.0, max_attempts=1000,
                              backoff_base=0.05, backoff_max=0.2)
    # (each actor retried until max_attempts: the run ended with every row failed, or the
    # 429s' hour of backoff)
    assert t_end - seen["stall"] == pytest.approx(5.0, abs=0.05)
    assert "outage_timeout" in str(exc)
    assert isinstance(exc.partial, pl.DataFrame)
    assert exc.partial["output"].is_not_null().sum() == 12


def test_ray_actors_tell_the_driver_of_answers_and_outages():
    from dfbatch import BatchConfig
    from dfbatch.engines.actor import AgentActor, BatchMeta, to_wire

    calls = {"n": 0}

    async def flaky(batch: pl.DataFrame) -> list[str]:
        calls["n"] += 1
        if calls["n"] <= 2:
            msg = "connection reset"
            raise ConnectionError(msg)
        return list(batch["text"])

    actor = AgentActor(flaky, BatchConfig(backoff_base=0.01), set(), None, "agent0", 1)

    async def one() -> list[Any]:
        meta = BatchMeta(id=1, planned_agent=0, tokens=2, nbytes=10, call_anyway=False)
        return [m async for m in actor.run(meta, to_wire(pl.DataFrame({"text": ["a"]})))]

    said = [m[1] for m in run(one()) if m[0] == "health"]
    assert said == ["outage", "outage", "ok"]


def test_a_long_retry_after_stops_the_run_though_calls_sent_before_it_answer():
    """A 429 asking for an hour while other calls are in flight: their answers disarm the
    breaker's stall clock, and nothing fails again while the pause holds every send. The run
    used to sit out the whole hour; it stops outage_timeout after the pause began
    (resumable, the answered rows kept)."""
    seen = {"calls": 0}

    async def fn(batch: pl.DataFrame) -> list[str]:
        seen["calls"] += 1
        if seen["calls"] == 3:
            await asyncio.sleep(0.1)
            raise Refused(3600.0)
        await asyncio.sleep(1.0)  # in flight when the 429 comes back: answered after it
        return [t.upper() for t in batch["text"]]

    t_end, exc = _stopped_run(fn, items_per_batch=4, max_concurrent_batches=2,
                              outage_timeout=5.0)
    assert t_end == pytest.approx(5.1, abs=0.05)
    assert "retry-after" in str(exc) and "outage_timeout" in str(exc)
    assert isinstance(exc.partial, pl.DataFrame)
    assert exc.partial["output"].is_not_null().sum() >= 4
