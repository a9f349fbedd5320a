"""The adapters under ``dfbatch.process`` against the simulator: retries, limits, isolation."""

from __future__ import annotations

import re
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.events import BatchRetried, BatchStarted
from dfbatch.llm import chat, embed
from dfbatch.sim.content import answer_text

TEXTS = [f"Document number {i} talks about topic {i % 5}. More words follow." for i in range(16)]
FRAME = pl.DataFrame({"text": TEXTS})
EXPECTED = [answer_text(f"Summarize: {t}") for t in TEXTS]
FAST = {"progress": False, "backoff_base": 0.01, "backoff_max": 0.05}


def test_429_retry_after_is_honored_and_every_row_succeeds(make_sim):
    # one request per 120 ms window; the first calls (0.4 s each) start at once, before the
    # client can learn the limit from the response headers: all but one get a 429 (a window
    # long enough that a loaded machine still sends two of them within one)
    server = make_sim(rpm=1, ttft_s=200.0, time_scale=0.002)
    fn = chat("sim-chat", base_url=server.url, max_tokens=32)
    events: list[Any] = []
    out = dfbatch.process(
        FRAME.head(6),
        fn,
        items_per_batch=1,
        agents=1,
        max_concurrent_batches=4,
        max_attempts=10,
        on_event=events.append,
        **FAST,
    )
    assert out["output"].to_list() == EXPECTED[:6]
    assert out["error"].null_count() == 6
    assert server.stats.snapshot().rate_limited >= 1
    retried = [e for e in events if isinstance(e, BatchRetried)]
    assert retried and all(e.rate_limited for e in retried)
    for e in retried:
        told = float(re.search(r"try again in ([0-9.]+)s", e.error).group(1))  # type: ignore[union-attr]
        assert e.delay_s >= told  # the server's retry-after is a floor on the wait
        again = next(
            s
            for s in events
            if isinstance(s, BatchStarted)
            and s.batch_id == e.batch_id
            and s.attempt == e.attempt + 1
        )
        assert again.t >= e.t + told


def test_client_side_rpm_equal_to_the_server_limit_avoids_429_storms(make_sim):
    server = make_sim(rpm=60, time_scale=0.1)  # 60 per 6 s: 10 per real second
    fn = chat("sim-chat", base_url=server.url, max_tokens=16)
    out = dfbatch.process(FRAME, fn, items_per_batch=1, rpm=server.config.real_rpm, **FAST)
    assert out["error"].null_count() == len(TEXTS)
    snap = server.stats.snapshot()
    assert snap.rate_limited <= 2  # paced by the client, not by 429s
    window = server.config.window_s
    assert server.stats.max_in_window(window) <= 2 * 60  # bucket capacity + one window's refill


def test_server_errors_are_retried(make_sim):
    server = make_sim(error_rate=0.3, seed=3)
    out = dfbatch.process(
        FRAME, chat("sim-chat", base_url=server.url), items_per_batch=2, max_attempts=10, **FAST
    )
    assert out["output"].to_list() == EXPECTED
    assert server.stats.snapshot().server_errors > 0
    assert out["attempts"].max() > 1  # type: ignore[operator]


def test_hangs_time_out_and_are_retried(make_sim):
    server = make_sim(hang_rate=0.2, seed=2, hang_s=600.0)  # a hang lasts 6 s at 0.01
    out = dfbatch.process(
        FRAME.head(8),
        chat("sim-chat", base_url=server.url),
        items_per_batch=2,
        timeout=0.3,
        max_attempts=10,
        **FAST,
    )
    assert out["output"].to_list() == EXPECTED[:8]
    assert server.stats.snapshot().hangs > 0


@pytest.mark.parametrize("mode", ["per_row", "batch"])
def test_poison_row_is_isolated(sim, mode):
    texts = [*TEXTS[:5], "please <<poison>> me", *TEXTS[5:8]]
    fn = chat("sim-chat", base_url=sim.url, mode=mode)
    out = dfbatch.process(pl.DataFrame({"text": texts}), fn, items_per_batch=4, **FAST)
    errors = out["error"].to_list()
    assert [i for i, e in enumerate(errors) if e is not None] == [5]
    assert "400" in errors[5] and "poison" in errors[5]
    assert out["output"].to_list()[:5] == EXPECTED[:5]
    if mode == "per_row":  # the adapter isolates it: no retry, no bisection
        assert out["attempts"].max() == 1


def test_batch_mode_unmapped_row_is_a_row_error_in_the_result(sim):
    texts = [*TEXTS[:3], "<<drop>> me"]
    fn = chat("sim-chat", base_url=sim.url, mode="batch")
    out = dfbatch.process(pl.DataFrame({"text": texts}), fn, items_per_batch=4, **FAST)
    assert out["error"].to_list()[:3] == [None] * 3
    assert "no result for item 4" in out["error"][3]
    assert sim.stats.snapshot().requests == 1


def test_embed_through_process(sim):
    out = dfbatch.process(
        FRAME, embed("sim-embed", dimensions=8, base_url=sim.url), items_per_batch=8, **FAST
    )
    assert out["output"].dtype == pl.List(pl.Float32)
    assert sim.stats.snapshot().by_endpoint == {"embeddings": 2}
