"""engine="ray": same result as asyncio, global rate limits across actors, actors may die.

The lease tests run without Ray. The Ray tests share one local Ray (``ray.init(num_cpus=2)``)
started by a module fixture and shut down after the last of them (with ``RAY_ADDRESS`` set,
they join that cluster instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.engines import select
from dfbatch.engines.lease import LeasedRates, Limiter, chunk, lease_ttl
from dfbatch.errors import FatalError, RetryableError
from dfbatch.events import BatchFinished, BatchRetried, BatchStarted, fold
from dfbatch.execute._limits import Cost, Outcome
from tests.fakes import expected, texts

SIMPLE = {"backoff_base": 0.001, "backoff_max": 0.01, "progress": False}


def _counter(ts: list[str]) -> list[int]:
    return [len(t.split()) for t in ts]


def _max_in_window(stamps: list[float], rate: float) -> float:
    """max over windows [t_i, t_j] of calls in it minus rate * (t_j - t_i)."""
    s = sorted(stamps)
    return max(j - i + 1 - rate * (s[j] - s[i]) for i in range(len(s)) for j in range(i, len(s)))


# -- leases: no Ray needed -------------------------------------------------------------------
def test_leased_rates_hold_the_global_bucket_and_lease_in_chunks() -> None:
    rpm, burst, n_clients, calls = 6000.0, 0.01, 4, 40  # 100/s, 60 at once, 160 calls
    ttl = lease_ttl(burst)
    spent: list[float] = []

    async def main() -> tuple[list[int], int]:
        limiter = Limiter(rpm, None, burst, ttl)
        clients = [
            LeasedRates(limiter.lease, f"c{i}", requests=True, tokens=False,
                        extra=(chunk(rpm, burst, n_clients, ttl), 0.0), ttl=ttl)
            for i in range(n_clients)
        ]
        loop = asyncio.get_running_loop()

        async def work(c: LeasedRates) -> None:
            for _ in range(calls):
                await c.acquire(Cost())
                spent.append(loop.time())
                await asyncio.sleep(0.001)

        await asyncio.gather(*(work(c) for c in clients))
        return [c.leases for c in clients], limiter.leases

    per_client, total = asyncio.run(main())
    rate, capacity = rpm / 60, rpm * burst
    assert len(spent) == n_clients * calls
    assert _max_in_window(spent, rate) <= capacity + 1e-6  # exact: units are spent once granted
    span, floor = max(spent) - min(spent), (len(spent) - capacity) / rate
    assert floor - 1e-3 <= span < 1.5 * floor  # the rate binds, and leases do not waste it
    assert total == sum(per_client) < n_clients * calls / 2  # chunks, not a lease per call


def test_token_estimates_are_corrected_with_the_next_lease() -> None:
    async def main() -> list[float | None]:
        limiter = Limiter(None, 600.0, 0.1, ttl=5.0)  # 60 tokens at once, 10/s
        c = LeasedRates(limiter.lease, "c", requests=False, tokens=True, extra=(0.0, 0.0),
                        ttl=5.0)
        await c.acquire(Cost(tokens=50))
        c.release(Cost(tokens=50), Outcome(actual_tokens=20))  # 30 tokens were not used
        t0 = asyncio.get_running_loop().time()
        await c.acquire(Cost(tokens=35))  # 10 left + 30 refunded: no wait
        assert asyncio.get_running_loop().time() - t0 < 0.5
        return limiter.stats()["levels"]

    levels = asyncio.run(main())
    assert levels[0] is None and levels[1] is not None and levels[1] < 10


def test_engine_arguments_are_checked_and_ray_is_not_imported() -> None:
    with pytest.raises(dfbatch.ConfigError, match="engine must be 'asyncio' or 'ray'"):
        dfbatch.process(texts(2), lambda b: b["text"], engine="rey", progress=False)
    with pytest.raises(dfbatch.ConfigError, match="needs engine='ray'"):
        dfbatch.process(texts(2), lambda b: b["text"], ray_address="auto", progress=False)
    with pytest.raises(dfbatch.ConfigError, match="out= runs on engine='asyncio' only"):
        dfbatch.process(texts(2), lambda b: b["text"], engine="ray", out="x.parquet")
    code = "import sys, dfbatch; sys.exit(any(m.startswith(('ray', 'dfbatch.engines.ray'))"
    code += " for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'dfbatch\[ray\]'"):
        select("ray", dfbatch.BatchConfig(), None)


def _lengths(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.len_chars()


def _in_main(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.len_chars()


def test_a_process_fn_the_actors_cannot_send_on_is_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dfbatch.engines

    def no_ray() -> None:
        msg = "Ray was started before fn was checked"
        raise AssertionError(msg)

    monkeypatch.setattr(dfbatch.engines, "load_ray", no_ray)
    monkeypatch.setattr(_in_main, "__module__", "__main__")  # as if defined in the script
    monkeypatch.setattr(sys.modules["__main__"], "_in_main", _in_main, raising=False)
    opts = dict(engine="ray", executor="process", progress=False)
    with pytest.raises(dfbatch.ConfigError, match=r"does not pickle.*executor='thread'"):
        dfbatch.process(texts(2), lambda b: b["text"], **opts)
    with pytest.raises(dfbatch.ConfigError, match=r"defined in __main__.*importable on every"):
        dfbatch.process(texts(2), _in_main, **opts)
    with pytest.raises(AssertionError, match="Ray was started"):  # a module's fn: on to Ray
        dfbatch.process(texts(2), _lengths, **opts)
    with pytest.raises(AssertionError, match="Ray was started"):  # threads: nothing to send
        dfbatch.process(texts(2), lambda b: b["text"], engine="ray", progress=False)


# -- on a local Ray ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    if os.environ.get("RAY_ADDRESS"):  # a cluster to test on: join it
        ray.init(log_to_driver=False)
        why = None
    else:
        why = _start_local_ray(ray) and _start_local_ray(ray)  # a second try if overloaded
    if why:
        pytest.skip(f"a local Ray did not start here: {why}")
    try:
        yield
    finally:
        ray.shutdown()


def _start_local_ray(ray: Any) -> str | None:
    """``ray.init(num_cpus=2)``; if it fails, end the processes it started and say why.

    Ray waits a fixed 30 s for its raylet to register, which an overloaded 2-core machine can
    miss; the half-started processes are then ended here, by pid, so they do not linger and
    their ``Popen`` objects do not warn later in the session.
    """
    before = _children()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return None
        except Exception as exc:  # Ray raises a bare Exception when the node times out
            why = f"{type(exc).__name__}: {exc}"
        for pid in _children() - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        gc.collect()
    return why


def _children() -> set[int]:
    me, out = str(os.getpid()), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                out.add(int(stat.parent.name))
    return out


def _named_actors(part: str) -> list[str]:
    import ray

    return [n for n in ray.util.list_named_actors() if n.startswith("dfbatch-") and part in n]


class _Flaky:
    """Deterministic: rows with POISON fail for good; batches starting at a multiple of 5 fail
    once with a retryable error, then answer. Reports usage. Sync (runs in a thread)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.calls = 0

    def __call__(self, batch: pl.DataFrame) -> list[str]:
        self.calls += 1
        first = int(batch["id"][0])
        if any("POISON" in t for t in batch["text"]):
            msg = "400: invalid input"
            raise FatalError(msg)
        if first % 5 == 0 and first not in self.seen:
            self.seen.add(first)
            msg = "429: slow down"
            raise RetryableError(msg, retry_after=0.01)
        dfbatch.report_usage(input_tokens=3 * batch.height, output_tokens=batch.height)
        return [expected(t) for t in batch["text"]]


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_same_result_frame_as_the_asyncio_engine(tmp_path: Path) -> None:
    df = texts(120, poison_every=29)
    kw = {"encoding": _counter, "agents": 3, "items_per_batch": 4, "dynamic_batching": False,
          **SIMPLE}  # the same batches in both engines, so the same attempts
    local = dfbatch.process(df, _Flaky(), **kw)
    events: list = []
    remote = dfbatch.process(df, _Flaky(), engine="ray", on_event=events.append,
                             checkpoint=tmp_path / "ckpt", **kw)
    timing = ["started_at", "elapsed_s", "run_agent_id", "run_batch_id"]
    assert remote.columns == local.columns
    assert remote.drop(timing).equals(local.drop(timing))
    assert remote.schema == local.schema
    assert remote.filter(pl.col("error").is_not_null()).height == 120 // 29
    assert (remote["attempts"] == 2).sum() > 0  # the retried batches
    whole = local["run_batch_id"] == local["batch_id"]  # rows whose batch was not bisected
    assert (remote["run_batch_id"].filter(whole) == local["run_batch_id"].filter(whole)).all()
    stats = fold(events)
    assert stats.rows_done == 120 and stats.in_flight == 0 and stats.retries > 0
    assert stats.input_tokens == 3 * (120 - 120 // 29)
    assert remote["started_at"].null_count() == 0 and (remote["elapsed_s"] > 0).all()
    # the Ray run journaled every batch: a rerun (any engine) calls fn for none of them
    again_fn = _Flaky()
    again = dfbatch.process(df, again_fn, checkpoint=tmp_path / "ckpt", **kw)
    assert again_fn.calls == 0
    assert again.select("output", "error").equals(remote.select("output", "error"))


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_rate_limit_is_global_across_actors() -> None:
    import ray

    @ray.remote
    class Spy:
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def record(self, stamp: float) -> None:
            self.stamps.append(stamp)

        def get(self) -> list[float]:
            return self.stamps

    spy = Spy.options(name="test-spy").remote()

    async def fn(batch: pl.DataFrame) -> list[str]:
        await spy.record.remote(time.monotonic())  # one machine: one monotonic clock
        return batch["text"].to_list()

    rpm, burst, n = 3000.0, 0.01, 150  # 50 calls/s, 30 at once
    out = dfbatch.process(texts(n), fn, engine="ray", encoding=_counter, agents=3,
                          items_per_batch=1, dynamic_batching=False, rpm=rpm,
                          rate_burst=burst, **SIMPLE)
    stamps = ray.get(spy.get.remote())
    ray.kill(spy)
    assert out["error"].null_count() == n and len(stamps) == n
    rate, capacity = rpm / 60, rpm * burst
    # a call starts a little after its unit was spent (event loop, load): 0.1 s of rate
    assert _max_in_window(stamps, rate) <= capacity + rate * 0.1
    assert max(stamps) - min(stamps) >= (n - capacity) / rate - 0.1
    assert out["run_agent_id"].n_unique() > 1  # several actors shared the one limit


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_dead_service_stops_a_ray_run_after_outage_timeout() -> None:
    answered = {"n": 0}  # (one actor: its copy of fn counts every call)

    async def fn(batch: pl.DataFrame) -> list[str]:
        answered["n"] += 1
        if answered["n"] > 2:
            msg = "connection refused"
            raise ConnectionError(msg)
        return [expected(t) for t in batch["text"]]

    t0 = time.monotonic()
    with pytest.raises(dfbatch.RunStoppedError) as info:
        dfbatch.process(texts(16), fn, engine="ray", agents=1, items_per_batch=2,
                        max_concurrent_batches=1, outage_timeout=1.0, max_attempts=1_000,
                        hedge_after=None, **SIMPLE)
    # (the actors ignored outage_timeout: each batch was tried up to 1,000 times)
    assert time.monotonic() - t0 < 60
    assert "outage_timeout" in str(info.value)
    partial = info.value.partial
    assert isinstance(partial, pl.DataFrame) and partial.height == 16
    assert partial["output"].is_not_null().sum() == 4  # the two answered batches
    assert partial.filter(pl.col("output").is_null())["error"].eq("cancelled").all()


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_killed_actor_loses_and_duplicates_no_row() -> None:
    import ray

    async def fn(batch: pl.DataFrame) -> list[str]:
        await asyncio.sleep(0.5)  # long enough for the kill to land mid-call
        return [expected(t) for t in batch["text"]]

    killed: list[str] = []
    events: list = []
    starts: Counter[int] = Counter()

    def on_event(ev: object) -> None:
        events.append(ev)
        if isinstance(ev, BatchStarted):
            starts[ev.agent_id] += 1
            if ev.agent_id == 0 and starts[0] == 3 and not killed:  # 2 batches in flight
                killed.extend(_named_actors("-agent0-0"))
                ray.kill(ray.get_actor(killed[0]))

    df = texts(48)
    # (no hedging: a tail hedge would be one more attempt of its rows, not the kill's)
    out = dfbatch.process(df, fn, engine="ray", encoding=_counter, agents=2,
                          items_per_batch=2, max_concurrent_batches=2, dynamic_batching=True,
                          hedge_after=None, on_event=on_event, **SIMPLE)
    assert len(killed) == 1
    assert out["id"].to_list() == df["id"].to_list()
    assert out["error"].null_count() == 48
    assert out["output"].to_list() == [expected(t) for t in df["text"]]
    died = {e.batch_id for e in events
            if isinstance(e, BatchRetried) and "ActorDiedError" in e.error}
    assert died, "the kill should have hit calls in flight"
    rows = {e.batch_id: e.rows for e in events if isinstance(e, BatchStarted)}
    assert (out["attempts"] == 2).sum() == sum(rows[b] for b in died)  # they ran again, once
    assert set(out["attempts"].unique()) == {1, 2}
    finished = [e for e in events if isinstance(e, BatchFinished)]
    assert sum(e.rows for e in finished) == 48  # no batch was recorded twice
    assert len({e.batch_id for e in finished}) == len(finished)
    assert fold(events).in_flight == 0
    deadline = time.monotonic() + 10  # the run's actors are killed: their names go
    while _named_actors("-agent") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _named_actors("-agent")


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_cache_is_read_and_written_by_the_driver(tmp_path: Path) -> None:
    df = texts(60)
    kw = {"encoding": _counter, "agents": 3, "items_per_batch": 4, **SIMPLE}
    cache = tmp_path / "cache.sqlite"
    first = dfbatch.process(df.head(30), _Flaky(), cache=cache, **kw)
    remote = dfbatch.process(df, _Flaky(), engine="ray", cache=cache, **kw)
    assert remote["cached"].sum() == 30 and (remote.head(30)["attempts"] == 0).all()
    assert (remote.tail(30)["attempts"] >= 1).all()  # the actors saw only the misses
    assert remote.head(30).select("output").equals(first.select("output"))
    again_fn = _Flaky()  # the driver wrote the actors' answers: no call at all now
    again = dfbatch.process(df, again_fn, cache=cache, **kw)
    assert again_fn.calls == 0 and again["cached"].all()
    assert again.select("output", "error").equals(remote.select("output", "error"))
