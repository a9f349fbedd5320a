"""Regressions for a hostile tester's findings: stale checkpoints, mixed types, ``out=``."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.errors import CheckpointError
from dfbatch.persist._code import Unsure, code_identity

QUIET: dict[str, Any] = {"progress": False}


# -- 1. fn's identity follows what its code reads -----------------------------------------------
def _user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str) -> Any:
    mod = types.ModuleType("hostile_cfg")
    mod.__file__ = str(tmp_path / "hostile_cfg.py")  # the user's own module, not a package
    exec(f"PREFIX = {prefix!r}\ndef tag(t):\n    return PREFIX + ':' + t\n", mod.__dict__)
    monkeypatch.setitem(__import__("sys").modules, "hostile_cfg", mod)
    return mod


def _reading(mod: Any, body: str) -> Any:
    ns: dict[str, Any] = {"hostile_cfg": mod, "__name__": "hostile_user"}
    exec(f"def fn(b):\n    return {body}\n", ns)
    return ns["fn"]


def test_a_module_attribute_or_helper_fn_reads_is_part_of_its_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = _user_module(tmp_path, monkeypatch, "1")
    attr = code_identity(_reading(one, "[hostile_cfg.PREFIX + t for t in b]"))
    helper = code_identity(_reading(one, "[hostile_cfg.tag(t) for t in b]"))
    two = _user_module(tmp_path, monkeypatch, "2")
    assert code_identity(_reading(two, "[hostile_cfg.PREFIX + t for t in b]")) != attr
    assert code_identity(_reading(two, "[hostile_cfg.tag(t) for t in b]")) != helper
    same = _user_module(tmp_path, monkeypatch, "1")
    assert code_identity(_reading(same, "[hostile_cfg.tag(t) for t in b]")) == helper


LABELS = ["pos", "neg"]


def uses_labels(batch: pl.DataFrame) -> list[str]:
    return [LABELS[0]] * batch.height


def _closing_over(labels: list[str]) -> Any:
    return lambda batch: [labels[0]] * batch.height


def _with_default(batch: pl.DataFrame, opts: dict[str, str] = {"p": "1"}) -> list[str]:  # noqa: B006
    return [opts["p"]] * batch.height


def test_lists_and_dicts_fn_reads_are_taken_by_content(monkeypatch: pytest.MonkeyPatch) -> None:
    before = code_identity(uses_labels)
    monkeypatch.setattr(f"{__name__}.LABELS", ["neg", "pos"])
    assert code_identity(uses_labels) != before
    assert code_identity(_closing_over(["a"])) != code_identity(_closing_over(["b"]))
    assert code_identity(_closing_over(["a"])) == code_identity(_closing_over(["a"]))
    before = code_identity(_with_default)
    monkeypatch.setitem(_with_default.__defaults__[0], "p", "2")  # type: ignore[index]
    assert code_identity(_with_default) != before


def test_a_container_fn_writes_is_run_state_and_one_it_cannot_value_is_refused(
    tmp_path: Path,
) -> None:
    calls: list[int] = []

    def logs(batch: pl.DataFrame) -> list[int]:
        calls.append(batch.height)
        return [1] * batch.height

    before = code_identity(logs)
    calls.extend([1, 2, 3])  # a call log that grew: fn is the same fn
    assert code_identity(logs) == before
    with pytest.raises(Unsure, match="too large"):
        code_identity(_closing_over(["x"] * 10_001))
    held = [object()]
    with pytest.raises(Unsure, match="object"):
        code_identity(_closing_over(held))  # type: ignore[arg-type]
    df = pl.DataFrame({"text": ["a"]})
    with pytest.raises(CheckpointError, match="dfbatch_fingerprint"):  # refused, not reused
        dfbatch.process(df, _closing_over(held), checkpoint=tmp_path, **QUIET)  # type: ignore[arg-type]


def test_a_changed_list_is_refused_by_the_checkpoint(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": ["a", "b"]})
    first = dfbatch.process(df, _closing_over(["pos"]), checkpoint=tmp_path, **QUIET)
    assert first["output"].to_list() == ["pos", "pos"]
    with pytest.raises(CheckpointError, match="captured changed"):
        dfbatch.process(df, _closing_over(["neg"]), checkpoint=tmp_path, **QUIET)
    again = dfbatch.process(df, _closing_over(["pos"]), checkpoint=tmp_path, **QUIET)
    assert again["output"].to_list() == ["pos", "pos"]


def _classes(v: str) -> tuple[Any, Any]:
    class Tagger:
        prefix = v

        def __call__(self, batch: pl.DataFrame) -> list[str]:
            return [self.prefix] * batch.height

    class Helper:
        @staticmethod
        def go(t: str) -> str:
            return Helper.P + t  # type: ignore[attr-defined,no-any-return]

    Helper.P = v  # type: ignore[attr-defined]

    def uses_helper(batch: pl.DataFrame) -> list[str]:
        return [Helper.go(t) for t in batch["text"]]

    return Tagger(), uses_helper


def test_class_attributes_and_helper_class_methods_are_part_of_the_identity() -> None:
    one, two, again = _classes("1"), _classes("2"), _classes("1")
    assert code_identity(one[0]) != code_identity(two[0])
    assert code_identity(one[1]) != code_identity(two[1])
    assert code_identity(one[0]) == code_identity(again[0])
    assert code_identity(one[1]) == code_identity(again[1])


# -- 2. / 3. one type per batch, decided strictly; a declared Float32 takes floats --------------
def _one_batch(values: list[Any], **kw: Any) -> pl.DataFrame:
    df = pl.DataFrame({"text": [f"r{i}" for i in range(len(values))]})
    return dfbatch.process(df, lambda b: values, items_per_batch=len(values), **QUIET, **kw)


def test_mixed_values_in_one_batch_become_row_errors_not_text() -> None:
    out = _one_batch([1, "s", 2, 3])
    assert out["output"].dtype == pl.Int64 and out["output"].to_list() == [1, None, 2, 3]
    assert "'s' (str) does not fit" in out["error"][1]
    out = _one_batch([True, 1, 2, 3])  # a bool is not an int, nor an int a bool
    assert out["output"].to_list() == [True, None, None, None]
    assert out["error"][1] is not None and "(int) does not fit" in out["error"][1]
    out = _one_batch([1, 2.5])  # numbers mix
    assert out["output"].to_list() == [1.0, 2.5] and out["error"].null_count() == 2
    out = _one_batch([[1, "a"], [2, 3]])  # a list polars would turn to text
    assert out["output"].to_list() == [None, [2, 3]] and "does not fit" in out["error"][0]
    out = _one_batch([{"a": 1}, {"b": "x"}])  # dicts with other keys still make one struct
    assert out["output"].to_list() == [{"a": 1, "b": None}, {"a": None, "b": "x"}]


def test_a_bool_after_an_int_batch_is_an_error_not_one() -> None:
    df = pl.DataFrame({"text": list("abcd")})
    out = dfbatch.process(df, lambda b: [1 if b["text"][0] == "a" else True] * b.height,
                          items_per_batch=2, agents=1, max_concurrent_batches=1, **QUIET)
    assert out["output"].to_list() == [1, 1, None, None]
    assert "True (Boolean) does not fit" in out["error"][2]


def test_a_declared_float32_accepts_floats_and_refuses_what_it_cannot_hold() -> None:
    out = _one_batch([0.1, 2, 1e300, None], output_dtype=pl.Float32)
    assert out["output"].dtype == pl.Float32
    assert out["output"].to_list()[:2] == pytest.approx([0.1, 2.0]) and out["error"][0] is None
    assert out["output"][2] is None and "1e+300" in out["error"][2]
    out = _one_batch([[0.1, 0.2], [1e300]], output_dtype=pl.List(pl.Float32))
    assert out["output"].dtype == pl.List(pl.Float32) and out["error"][0] is None
    assert out["output"][0].to_list() == pytest.approx([0.1, 0.2])
    assert out["output"][1] is None and out["error"][1] is not None


# -- 4. out= never replaces the input, and is a .parquet file ----------------------------------
def test_out_that_the_lazyframe_reads_is_refused_before_any_call(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pl.DataFrame({"text": ["a", "b"]}).write_parquet(src)
    calls: list[int] = []

    def fn(batch: pl.DataFrame) -> pl.Series:
        calls.append(batch.height)
        return batch["text"]

    for lf in (pl.scan_parquet(src).filter(pl.col("text") != ""),
               pl.scan_parquet(tmp_path / "*.parquet")):
        with pytest.raises(dfbatch.ConfigError, match=r"out=.*reads"):
            dfbatch.process(lf, fn, out=src, **QUIET)
    with pytest.raises(dfbatch.ConfigError, match=r"out=.*reads"):  # a glob that would match it
        dfbatch.process(pl.scan_parquet(tmp_path / "*.parquet"), fn,
                        out=tmp_path / "out.parquet", **QUIET)
    assert calls == [] and pl.read_parquet(src).columns == ["text"]
    other = tmp_path / "sub"
    other.mkdir()
    dfbatch.process(pl.scan_parquet(src), fn, out=other / "in.parquet", **QUIET)
    assert pl.read_parquet(other / "in.parquet")["output"].to_list() == ["a", "b"]


def test_out_must_be_a_parquet_file(tmp_path: Path) -> None:
    lf = pl.DataFrame({"text": ["a"]}).lazy()
    with pytest.raises(dfbatch.ConfigError, match=r"out=.*\.parquet"):
        dfbatch.process(lf, lambda b: b["text"], out=tmp_path / "x.csv", **QUIET)
    assert not (tmp_path / "x.csv").exists()


# -- 5. SystemExit / KeyboardInterrupt from fn carry the partial result -------------------------
@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_system_exit_or_keyboard_interrupt_from_fn_carries_the_partial_result(
    kind: type[BaseException], is_async: bool,
) -> None:
    df = pl.DataFrame({"text": [f"t{i}" for i in range(16)]})

    def plain(batch: pl.DataFrame) -> list[str]:
        if batch["text"][0] == "t8":
            raise kind(3)
        return list(batch["text"])

    async def coro(batch: pl.DataFrame) -> list[str]:
        return plain(batch)

    fn = coro if is_async else plain

    with pytest.raises(kind) as info:
        dfbatch.process(df, fn, items_per_batch=8, agents=1, max_concurrent_batches=1, **QUIET)
    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial["output"].to_list()[:8] == [f"t{i}" for i in range(8)]
    assert partial["error"][8].startswith(f"not finished: the run raised {kind.__name__}")


def test_a_pydantic_model_fn_uses_is_taken_by_its_fields() -> None:
    pydantic = pytest.importorskip("pydantic")

    def model(default: float) -> Any:
        class Answer(pydantic.BaseModel):  # type: ignore[name-defined,misc]
            label: str
            score: float = default
            tags: list[str] = []  # noqa: RUF012

        def fn(batch: pl.DataFrame) -> list[str]:
            return [Answer.model_validate({"label": t}).label for t in batch["text"]]

        return fn

    assert code_identity(model(0.0)) == code_identity(model(0.0))  # no Unsure: its schema
    assert code_identity(model(0.0)) != code_identity(model(1.0))  # is bookkeeping, not state


# -- a few rows the server always fails are not an outage (outage_timeout, the breaker) --------
class _Status500(Exception):
    status_code = 500


@pytest.mark.parametrize("how", ["500", "slow"])
def test_poison_rows_at_the_tail_neither_open_the_breaker_nor_stop_the_run(how: str) -> None:
    """2% of rows always fail (a 500, or a call past ``timeout``) while the rest answer: the
    tail of the run is only those rows' retries, which looks like an outage from outside.
    They fail alone, within their attempts; the run neither stops nor probes for minutes."""
    import time

    async def fn(batch: pl.DataFrame) -> list[int]:
        poison = any(i % 50 == 7 for i in batch["id"])
        await asyncio.sleep(0.1 if poison and how == "slow" else 0.005)
        if poison and how == "500":
            msg = "500 Internal Server Error"
            raise _Status500(msg)
        return (batch["id"] * 2).to_list()

    df = pl.DataFrame({"id": range(400), "text": [f"r{i}" for i in range(400)]})
    t0 = time.monotonic()
    out = dfbatch.process(df, fn, progress=False, items_per_batch=4, max_attempts=3,
                          backoff_base=0.01, timeout=0.05, outage_timeout=3.0)
    assert time.monotonic() - t0 < 10  # (it stopped the run after outage_timeout, or probed
    bad = out.filter(pl.col("error").is_not_null())  # for ~10 minutes with the default)
    poison = {i for i in range(400) if i % 50 == 7}
    assert poison <= set(bad["id"].to_list())
    assert bad.height <= 6 * len(poison)  # only the poison rows' batches (a 500 is not split)
    good = out.filter(pl.col("error").is_null())
    assert good["output"].to_list() == (good["id"] * 2).to_list()
    if how == "slow":  # a call that hangs is bisected: the good rows beside it are answered
        assert bad.height == 8
