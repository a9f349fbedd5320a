"""The pool's own cost: contiguous (zero-copy) batches, events built only when someone listens."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import dfbatch
from dfbatch.config import BatchConfig
from dfbatch.errors import RowError
from dfbatch.execute import _recorder
from dfbatch.execute._pool import contiguous
from dfbatch.execute._recorder import Outcomes
from dfbatch.execute._scheduler import Batch, Scheduler


def _scattered(n: int, n_batches: int) -> pl.DataFrame:
    """A planned frame whose batches interleave: row i is in batch i % n_batches."""
    return pl.DataFrame({
        "id": range(n), "text": [f"row {i}" for i in range(n)],
        "n_tokens": pl.Series([1] * n, dtype=pl.UInt32),
        "batch_id": pl.Series([i % n_batches for i in range(n)], dtype=pl.UInt32),
        "agent_id": pl.Series([(i % n_batches) % 2 for i in range(n)], dtype=pl.UInt16),
        "plan_flag": pl.Series([None] * n, dtype=pl.Utf8),
    })


def test_scattered_batches_reach_fn_as_zero_copy_slices_and_come_back_in_input_order() -> None:
    df = _scattered(40, 5)
    seen: list[list[int]] = []

    def fn(batch: pl.DataFrame) -> list[int]:
        seen.append(batch["id"].to_list())
        return [i * 10 for i in batch["id"]]

    out = dfbatch.process(df, fn, progress=False)  # runs as planned (agent_id 0 and 1)
    assert out["id"].to_list() == list(range(40))  # input order
    assert out["output"].to_list() == [i * 10 for i in range(40)]
    assert out["run_batch_id"].to_list() == [i % 5 for i in range(40)]
    assert sorted(sorted(s) for s in seen) == [list(range(b, 40, 5)) for b in range(5)]


def test_contiguous_reorders_the_frame_once_and_numbers_ranges() -> None:
    frame = pl.DataFrame({"x": [0, 1, 2, 3, 4, 5]})
    batches = [[Batch(0, 0, np.array([4, 0]), 1, 0)], [Batch(1, 1, np.array([5, 1, 3, 2]), 1, 0)]]
    order, sorted_frame, moved = contiguous(frame, batches)
    assert order is not None and order.tolist() == [4, 0, 5, 1, 3, 2]
    assert sorted_frame["x"].to_list() == [4, 0, 5, 1, 3, 2]
    assert [(b.at, b.rows.tolist()) for q in moved.lists() for b in q] == [
        (0, [0, 1]), (2, [2, 3, 4, 5])]
    ordered = [[Batch(0, 0, np.array([0, 1]), 1, 0)], [Batch(1, 1, np.array([2, 3, 4, 5]), 1, 0)]]
    assert contiguous(frame, ordered)[0] is None  # in batch order already: no gather


def test_bisected_and_resized_batches_stay_contiguous_ranges() -> None:
    cfg = BatchConfig(request_overhead_tokens=0)
    b = Batch(0, 0, np.arange(10, 18), 80, 0, at=10)
    s = Scheduler([[b]], cfg, row_tokens=np.ones(20, np.int64))
    halves = s.halves(b)
    assert [(h.at, h.rows.tolist(), h.index) for h in halves] == [
        (10, [10, 11, 12, 13], slice(10, 14)), (14, [14, 15, 16, 17], slice(14, 18))]
    assert [h.tokens for h in halves] == [4 + 4 * cfg.output_tokens_per_row] * 2
    scattered = Batch(1, 0, np.array([3, 1]), 20, 0)
    assert [h.at for h in s.halves(scattered)] == [-1, -1]


def test_outcomes_reordered_back_to_frame_order() -> None:
    o = Outcomes(3)
    o.attempts[:] = [1, 2, 3]
    o.errors[0], o.errors[2] = "a", "c"
    o.pieces = [(np.array([0, 1]), pl.DataFrame({"output": [7, 8]}))]
    back = o.reordered(np.array([2, 0, 1]))
    assert back.attempts.tolist() == [2, 3, 1]
    assert list(back.errors) == [None, "c", "a"]
    assert back.pieces[0][0].tolist() == [2, 0]


@pytest.mark.parametrize("n_batches", [5, 3000])  # written one by one, and in bulk
def test_batches_stamped_in_bulk_read_as_if_each_were_written_at_once(
        monkeypatch: pytest.MonkeyPatch, n_batches: int) -> None:
    """Stamps are gathered and written to the per-row arrays in bulk (every ``STAMPS``
    batches, and at every read): each read sees every batch stamped so far, exactly."""
    monkeypatch.setattr(_recorder, "STAMPS", 1024)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, n_batches)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = int(sizes.sum()) + 3
    o = Outcomes(n)
    want = {"attempts": np.zeros(n, np.uint16), "run_batch": np.zeros(n, np.uint32),
            "run_agent": np.zeros(n, np.uint16), "started": np.full(n, np.nan),
            "elapsed": np.full(n, np.nan), "done": np.zeros(n, bool)}
    for i in rng.permutation(n_batches).tolist():  # (batches end in any order)
        at, size = int(starts[i]), int(sizes[i])
        wall0, elapsed, tries = 1.7e9 + i / 7, i / 3, 1 + i % 3
        o.stamp(at, size, 70_000 + i, i % 4, wall0, elapsed, tries)
        for name, value in (("attempts", tries), ("run_batch", 70_000 + i),
                            ("run_agent", i % 4), ("started", wall0), ("elapsed", elapsed),
                            ("done", True)):
            want[name][at:at + size] = value
    o.add_attempts(slice(0, 2), 1)  # a bisected batch's attempts: added, not stamped
    want["attempts"][:2] += 1
    scattered = np.array([n - 1, n - 3])
    o.stamp_rows(scattered, 9, 1, 5.0, 0.5, 2)
    want["attempts"][scattered] += 2
    want["run_batch"][scattered], want["run_agent"][scattered] = 9, 1
    want["started"][scattered], want["elapsed"][scattered], want["done"][scattered] = 5.0, 0.5, 1
    for name, values in want.items():
        np.testing.assert_array_equal(getattr(o, name), values, err_msg=name)
    assert not o.done[n - 2]


def test_row_errors_and_bisection_land_on_the_right_rows_after_reordering() -> None:
    df = _scattered(24, 3)

    def fn(batch: pl.DataFrame) -> list[object]:
        if 7 in batch["id"].to_list():
            msg = "poison"
            raise ValueError(msg)  # bisected down to row 7 alone
        return [RowError("odd") if i % 2 else i for i in batch["id"]]

    out = dfbatch.process(df, fn, progress=False, max_attempts=1)
    errors = dict(zip(out["id"].to_list(), out["error"].to_list(), strict=True))
    assert errors[7] is not None and "poison" in errors[7]
    assert all((errors[i] is None) == (i % 2 == 0) for i in range(24) if i != 7)
    assert out.filter(pl.col("error").is_null())["output"].to_list() == list(range(0, 24, 2))


def test_no_batch_events_are_built_when_nobody_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        msg = "an event was built though nobody listens"
        raise AssertionError(msg)

    monkeypatch.setattr(_recorder, "BatchStarted", refuse)
    monkeypatch.setattr(_recorder, "BatchFinished", refuse)
    df = pl.DataFrame({"text": [f"t{i}" for i in range(20)]})
    out = dfbatch.process(df, lambda b: b["text"], items_per_batch=4, progress=False)
    assert out["error"].is_null().all()
    with pytest.raises(AssertionError, match="nobody listens"):  # a listener gets them built
        dfbatch.process(df, lambda b: b["text"], items_per_batch=4, progress=False,
                        on_event=lambda ev: None)


def test_plain_list_outputs_are_kept_and_built_into_one_column_at_the_end() -> None:
    from dfbatch.execute._outputs import Values, normalize
    from dfbatch.execute._result import _frames

    piece, errors = normalize([1, None, 3], 3, "output", reserved=set())
    assert isinstance(piece, Values) and errors is None and piece.kind is int
    o = Outcomes(6)
    o.pieces = [(np.array([0, 1]), Values("output", [None, None])),
                (np.array([2, 3]), Values("output", [1, 2], int)),
                (np.array([4, 5]), Values("output", [3, 4], int))]
    (merged,) = _frames(o)  # one column for the three batches
    assert merged[0].tolist() == list(range(6))
    assert merged[1]["output"].to_list() == [None, None, 1, 2, 3, 4]
    o.pieces.append((np.array([6]), Values("output", ["x"], str)))
    o.n = 7
    assert [len(r) for r, _ in _frames(o)] == [6, 1]  # another type: not merged


def test_kept_outputs_are_a_copy_of_fns_list() -> None:
    from dfbatch.execute._outputs import Values, normalize

    returned = [1, 2]
    piece, _ = normalize(returned, 2, "output", reserved=set())
    returned[0] = 9  # fn reuses its list for the next batch
    assert isinstance(piece, Values) and piece.values == [1, 2]


def test_the_run_holds_no_object_per_batch_only_those_in_flight() -> None:
    """Batches are columns (``Batches``); a ``Batch`` object lives only while it runs."""
    import gc

    alive: list[int] = []
    calls = [0]

    def fn(batch: pl.DataFrame) -> list[int]:
        calls[0] += 1
        if calls[0] % 50 == 0:
            alive.append(sum(isinstance(o, Batch) for o in gc.get_objects()))
        return list(range(batch.height))

    df = pl.DataFrame({"text": [f"t{i}" for i in range(1000)]})
    out = dfbatch.process(df, fn, items_per_batch=2, agents=2, max_concurrent_batches=1,
                          hedge_after=None, progress=False)  # (a slow fn: never cut)
    assert out["output"].to_list() == [i % 2 for i in range(1000)]
    assert calls[0] == 500 and max(alive) < 100  # not one per batch of the run (500)


def test_gathered_outputs_split_back_per_batch_where_one_column_would_change_a_value() -> None:
    """Plain outputs of contiguous batches are built into one column per chunk only where that
    changes nothing; a batch whose ints do not fit the first batch's type fails alone."""
    from dfbatch.execute._outputs import Values
    from dfbatch.execute._pieces import Pieces

    p = Pieces()
    p.add(np.arange(0, 2), 0, Values("output", [1, 2], int))
    p.add(np.arange(2, 4), 2, Values("output", [2**70, 3], int))  # no Int64 column holds it
    p.add(np.arange(4, 5), 4, Values("output", ["x"], str))  # another type: a new chunk
    items = p.items()
    assert [r.tolist() for r, _ in items] == [[0, 1], [2, 3], [4]]
    assert all(isinstance(v, Values) for _, v in items[:2])
    df = pl.DataFrame({"text": ["a", "b", "c", "d"]})
    out = dfbatch.process(df, lambda b: [2**70 if t == "c" else 1 for t in b["text"]],
                          items_per_batch=2, agents=1, progress=False)
    assert out["output"].to_list() == [1, 1, None, 1]
    assert out["error"][2] is not None and out["error"].null_count() == 3


def test_a_live_view_counts_each_batch_without_building_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dfbatch.display
    from dfbatch.events import Event, RunStats, fold
    from tests.fakes import RecordingView

    view = RecordingView()
    shown = view.shown
    monkeypatch.setattr(dfbatch.display, "open_display", lambda progress, **kw: view)

    def fn(batch: pl.DataFrame) -> list[object]:
        if 7 in batch["id"].to_list():
            msg = "poison"
            raise ValueError(msg)  # bisected down to row 7 alone
        return [RowError("odd") if i % 3 == 0 else i for i in batch["id"]]

    df = pl.DataFrame({"id": range(24), "text": [f"t{i}" for i in range(24)]})
    opts = {"items_per_batch": 4, "agents": 1, "max_attempts": 1, "progress": "bar"}
    events: list[Event] = []
    dfbatch.process(df, fn, on_event=events.append, **opts)  # a listener: events are built
    told = shown[-1]
    assert told.rows_done == 24 and told.errors >= 1

    def refuse(*args: object, **kwargs: object) -> None:
        msg = "an event was built for the live view"
        raise AssertionError(msg)

    for name in ("BatchStarted", "BatchFinished", "BatchFailed"):
        monkeypatch.setattr(_recorder, name, refuse)
    dfbatch.process(df, fn, **opts)  # the live view alone: no batch event is built
    counted = shown[-1]
    timing = ("elapsed_s", "mean_latency_s", "p50_latency_s", "p95_latency_s", "history",
              "incidents", "agents")
    same = {k: getattr(fold(events), k) for k in RunStats.__dataclass_fields__
            if k not in timing}
    assert {k: getattr(counted, k) for k in same} == same
    assert {k: getattr(told, k) for k in same} == same
    agent_counts = [(a.done_rows, a.done_batches, a.errors, a.done_tokens) for a in told.agents]
    assert [(a.done_rows, a.done_batches, a.errors, a.done_tokens)
            for a in counted.agents] == agent_counts


@pytest.mark.parametrize("all_ran", [True, False])
def test_assembly_nulls_the_run_columns_of_rows_that_never_ran_only(all_ran: bool) -> None:
    from dfbatch.config import Columns
    from dfbatch.execute._result import assemble

    o = Outcomes(3)
    o.pieces = [(np.array([0, 1, 2]), pl.DataFrame({"output": [7, 8, 9]}))]
    ran = [True, True, all_ran]
    for i in range(3):
        if ran[i]:
            o.attempts[i], o.run_batch[i], o.run_agent[i] = 1, i, 2
            o.started[i], o.elapsed[i], o.done[i] = 1_700_000_000.5, 0.25, True
    out = assemble(pl.DataFrame({"id": [0, 1, 2]}), o, Columns())
    assert out.schema["started_at"] == pl.Datetime("us", "UTC")
    assert out.schema["run_batch_id"] == pl.UInt32 and out.schema["elapsed_s"] == pl.Float64
    for col in ("run_batch_id", "run_agent_id", "started_at", "elapsed_s"):
        assert out[col].is_null().to_list() == [not r for r in ran], col
    assert out["started_at"][0].timestamp() == 1_700_000_000.5


def test_per_row_and_per_batch_counts_are_held_as_int32_where_they_fit() -> None:
    from dfbatch.run._prepare import _narrowed

    small = _narrowed(np.array([0, 5, 2**31 - 1], np.int64))
    assert small.dtype == np.int32 and small.tolist() == [0, 5, 2**31 - 1]
    big = np.array([1, 2**31], np.int64)
    assert _narrowed(big).dtype == np.int64 and _narrowed(big).tolist() == [1, 2**31]
    assert _narrowed(np.zeros(0, np.int64)).dtype == np.int32
    assert _narrowed(np.array([2**32 - 1], np.uint32)).tolist() == [2**32 - 1]  # (kept exact)
    assert _narrowed(np.array([7], np.uint32)).dtype == np.int32


@pytest.mark.parametrize("all_ran", [True, False])
def test_a_consuming_assembly_builds_the_same_result(all_ran: bool) -> None:
    from dfbatch.config import Columns
    from dfbatch.execute._result import assemble

    n = 200_000  # (several blocks of the in-place conversion)
    rng = np.random.default_rng(1)

    def outcomes() -> Outcomes:
        o = Outcomes(n)
        o.pieces = [(np.arange(n // 2), pl.DataFrame({"output": np.arange(n // 2)})),
                    (np.arange(n // 2, n), pl.DataFrame({"output": np.arange(n // 2, n)}))]
        o.attempts[:], o.run_batch[:] = 1, np.arange(n) // 4
        o.started[:] = 1_700_000_000 + rng.random(n) * 1e5
        o.elapsed[:], o.done[:] = 0.5, True
        if not all_ran:
            o.done[::7] = False
            o.started[::7] = np.nan
        return o

    frame = pl.DataFrame({"id": np.arange(n)})
    state = rng.bit_generator.state
    kept = assemble(frame, outcomes(), Columns())
    rng.bit_generator.state = state
    used = outcomes()
    eaten = assemble(frame, used, Columns(), consume=True)
    assert eaten.equals(kept) and eaten.schema == kept.schema
    assert len(used.started) == 0 and not used.pieces
