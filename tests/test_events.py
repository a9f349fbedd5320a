"""The pure fold from run events to RunStats snapshots."""

from __future__ import annotations

import itertools

import pytest

from dfbatch.events import (
    BatchFailed,
    BatchFinished,
    BatchRetried,
    BatchStarted,
    RunFinished,
    RunStarted,
    StatsAccumulator,
    fold,
)
from tests.test_display_helpers import synthetic_events


def start(t: float = 0.0, rows: int = 12, batches: int = 3, planned: tuple[int, ...] = (60, 30)):
    return RunStarted(t, rows, batches, sum(planned), planned)


def began(t: float, b: int, agent: int, planned: int | None = None, tokens: int = 10):
    return BatchStarted(t, b, agent, agent if planned is None else planned, 4, tokens, 1)


def done(t: float, b: int, agent: int, elapsed: float, planned: int | None = None,
         tokens: int = 10, error_rows: int = 0):
    planned = agent if planned is None else planned
    return BatchFinished(t, b, agent, planned, 4, tokens, elapsed, 4 - error_rows, error_rows)


def test_mean_latency_is_the_true_mean_not_a_pairwise_average() -> None:
    evs = [start(), began(0, 0, 0), began(0, 1, 0), began(0, 2, 0),
           done(1, 0, 0, 1.0), done(2, 1, 0, 2.0), done(6, 2, 0, 6.0)]
    s = fold(evs)
    assert s.mean_latency_s == pytest.approx(3.0)  # (avg+new)/2 would give 4.25
    assert s.agents[0].mean_latency_s == pytest.approx(3.0)
    assert s.agents[0].busy_s == pytest.approx(9.0)
    assert s.p50_latency_s == 2.0
    assert s.p95_latency_s == 6.0


def test_in_flight_counts_per_run_and_per_agent() -> None:
    evs = [start(), began(0, 0, 0, tokens=7), began(0, 1, 0, tokens=5), began(0, 2, 1, tokens=3)]
    s = fold(evs)
    assert s.in_flight == 3
    assert [a.in_flight for a in s.agents] == [2, 1]
    assert [a.inflight_tokens for a in s.agents] == [12, 3]
    s = fold([*evs, done(1, 0, 0, 1.0, tokens=7)])
    assert s.in_flight == 2
    assert [a.inflight_tokens for a in s.agents] == [5, 3]
    assert s.agents[0].done_tokens == 7


def test_stolen_batches_and_tokens_count_for_the_agent_that_ran_them() -> None:
    evs = [start(), began(0, 0, 1, planned=0, tokens=20), began(0, 1, 0, tokens=5),
           done(1, 0, 1, 1.0, planned=0, tokens=20), done(1, 1, 0, 1.0, tokens=5)]
    s = fold(evs)
    assert [a.stolen for a in s.agents] == [0, 1]
    assert [a.stolen_tokens for a in s.agents] == [0, 20]
    assert [a.done_tokens for a in s.agents] == [5, 20]
    assert [a.planned_tokens for a in s.agents] == [60, 30]


def test_retries_429s_and_incidents() -> None:
    evs = [start(), began(0, 0, 0), BatchRetried(1.0, 0, 0, 10, 1, 0.5, "429", True),
           began(1.5, 0, 0), BatchRetried(2.0, 0, 0, 10, 2, 0.5, "timeout"),
           began(2.5, 0, 0), done(3.0, 0, 0, 0.5)]
    s = fold(evs)
    assert (s.retries, s.rate_limited, s.calls, s.in_flight) == (2, 1, 3, 0)
    assert s.incidents == ((1.0, "429"), (2.0, "retry"))
    assert s.agents[0].retries == 2
    assert s.rows_done == 4


def test_bisected_failure_is_not_done_but_a_final_failure_is() -> None:
    evs = [start(), began(0, 0, 0),
           BatchFailed(1.0, 0, 0, 0, 4, 10, 1.0, "boom", bisected=True)]
    s = fold(evs)
    assert (s.errors, s.rows_done, s.rows_failed, s.batches_done) == (1, 0, 0, 0)
    evs += [began(1, 0, 0), BatchFailed(2.0, 0, 0, 0, 4, 10, 1.0, "boom")]
    s = fold(evs)
    assert (s.errors, s.rows_done, s.rows_failed, s.batches_done) == (2, 4, 4, 1)
    assert [k for _, k in s.incidents] == ["error", "error"]


def test_row_errors_inside_a_finished_batch() -> None:
    s = fold([start(), began(0, 0, 0), done(1.0, 0, 0, 1.0, error_rows=3)])
    assert (s.rows_done, s.rows_ok, s.rows_failed, s.errors) == (4, 1, 3, 0)


def test_elapsed_eta_and_rates_while_running_and_finished() -> None:
    acc = StatsAccumulator()
    for ev in [start(t=100.0, rows=8), began(100, 0, 0), done(102.0, 0, 0, 2.0)]:
        acc.apply(ev)
    s = acc.snapshot(now=104.0)
    assert s.elapsed_s == pytest.approx(4.0)
    assert s.rows_per_s == pytest.approx(1.0)
    assert s.eta_s == pytest.approx(4.0)
    assert not s.finished
    acc.apply(RunFinished(106.0, cancelled=True))
    s = acc.snapshot(now=500.0)  # finished: the clock stops at the last event
    assert s.elapsed_s == pytest.approx(6.0)
    assert s.finished and s.cancelled
    assert s.eta_s == 0.0


def test_history_is_sampled_and_ends_with_the_final_state() -> None:
    evs = [start(rows=400, batches=100)]
    for i in range(100):
        evs += [began(i * 0.05, i, 0), done(i * 0.05 + 0.01, i, 0, 0.01)]
    evs.append(RunFinished(5.0))
    s = fold(evs)
    ts = [t for t, _, _ in s.history]
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(ts[:-1]))
    assert 20 <= len(ts) <= 30
    assert s.history[-1] == (5.0, 400, 1000)


def test_history_of_a_long_run_stays_bounded_and_evenly_thinned() -> None:
    acc = StatsAccumulator(max_history=100)
    n = 5_000  # 5,000 batches over 1,000 s: 5,000 samples at 0.2 s without thinning
    acc.apply(start(rows=4 * n, batches=n))
    for i in range(n):
        acc.apply(began(i * 0.2, i, 0))
        acc.apply(done(i * 0.2 + 0.1, i, 0, 0.1))
    acc.apply(RunFinished(n * 0.2))
    s = acc.snapshot()
    ts = [t for t, _, _ in s.history]
    assert 50 <= len(ts) <= 100
    assert ts[0] == pytest.approx(0.1) and ts == sorted(ts)
    assert s.history[-1] == (pytest.approx(n * 0.2), 4 * n, 10 * n)
    gaps = [b - a for a, b in itertools.pairwise(ts[1:-1])]
    assert max(gaps) <= 2 * min(gaps) + 1e-9  # evenly spaced, ~1000 s / 100
    assert min(gaps) >= 6.4


def test_a_long_random_stream_is_consistent() -> None:
    s = fold(synthetic_events(n_agents=5, n_batches=200, seed=11))
    assert s.rows_done == s.total_rows == 800
    assert s.rows_ok + s.rows_failed == s.rows_done
    assert s.in_flight == 0
    assert sum(a.done_tokens for a in s.agents) == s.total_tokens
    assert sum(a.planned_tokens for a in s.agents) == s.total_tokens
    assert sum(a.done_batches for a in s.agents) == s.batches_done == 200
    assert s.calls == s.batches_done + s.retries


def test_calls_of_one_batch_id_in_flight_end_oldest_first() -> None:
    # events folded from elsewhere (not the pool) may have two calls of one batch id in flight
    acc = StatsAccumulator()
    for ev in [start(), began(1.0, 0, 0), began(2.0, 0, 1), began(3.0, 1, 1)]:
        acc.apply(ev)
    assert acc.snapshot(now=10.0).oldest_in_flight_s == pytest.approx(9.0)
    acc.apply(done(4.0, 0, 0, 3.0))  # the call that began at 1.0 ends
    assert acc.snapshot(now=10.0).oldest_in_flight_s == pytest.approx(8.0)
    acc.apply(done(5.0, 0, 1, 3.0))
    s = acc.snapshot(now=10.0)
    assert s.oldest_in_flight_s == pytest.approx(7.0) and s.in_flight == 1
    acc.apply(done(6.0, 1, 1, 3.0))
    assert acc.snapshot(now=10.0).oldest_in_flight_s == 0.0


def test_batch_calls_folded_from_their_fields_equal_the_events_folded() -> None:
    evs = [start(), began(0, 0, 0), began(0, 1, 1, planned=0, tokens=20),
           BatchFailed(0.5, 1, 1, 0, 4, 20, 0.5, "boom", bisected=True),
           done(1.0, 0, 0, 1.0, error_rows=1),
           BatchFinished(2.0, 2, 1, 0, 2, 8, 1.5, 2, 0, input_tokens=30, output_tokens=5),
           BatchFailed(2.5, 3, 1, 1, 2, 12, 0.5, "boom"), RunFinished(3.0)]
    acc = StatsAccumulator()
    for ev in evs:
        if isinstance(ev, BatchStarted):
            acc.batch_started(ev.t, ev.batch_id, ev.agent_id, ev.tokens)
        elif isinstance(ev, BatchFinished):
            acc.batch_finished(ev.t, ev.batch_id, ev.agent_id, ev.planned_agent, ev.rows,
                               ev.tokens, ev.elapsed_s, ev.ok_rows, ev.error_rows,
                               ev.input_tokens, ev.output_tokens)
        elif isinstance(ev, BatchFailed):
            acc.batch_failed(ev.t, ev.batch_id, ev.agent_id, ev.rows, ev.tokens, ev.elapsed_s,
                             bisected=ev.bisected)
        else:
            acc.apply(ev)
    s = acc.snapshot()
    assert s == fold(evs)
    assert (s.rows_done, s.rows_ok, s.rows_failed, s.batches_done, s.tokens_done) == (
        8, 5, 3, 3, 30)
    assert (s.calls, s.errors, s.input_tokens, s.output_tokens) == (2, 2, 30, 5)
    stolen = [(a.done_rows, a.stolen, a.stolen_tokens) for a in s.agents]
    assert stolen == [(4, 0, 0), (4, 1, 8)]  # a failed batch counts as done, not as stolen


def test_every_int_count_of_runstats_is_counted() -> None:
    from dfbatch.events import RunStats

    ints = {k for k, f in RunStats.__dataclass_fields__.items() if f.type == "int"}
    assert set(StatsAccumulator().counts()) == ints
