"""Regressions for a hostile tester's findings: stale checkpoints, mixed types, ``out=``."""

from __future__ import annotations

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
