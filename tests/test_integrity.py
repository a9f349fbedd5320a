"""Integrity (issue 14): bad input fails before the first call, a paid answer is never lost."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import dfbatch
from dfbatch.config import BatchConfig, Columns
from dfbatch.errors import ConfigError

QUIET = {"progress": False}


def upper(batch: pl.DataFrame) -> pl.Series:
    return batch["text"].str.to_uppercase()


class CountingFn:
    """Counts the rows it was called with (to show that bad input made no call)."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, batch: pl.DataFrame) -> pl.Series:
        self.rows += batch.height
        return batch["text"].str.to_uppercase()


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timeout", "rpm", "tpm", "backoff_max", "backoff_base",
                                  "target_latency_s", "rate_burst", "hedge_after"])
def test_nan_settings_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        BatchConfig(**{name: math.nan})


def test_infinite_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        BatchConfig(timeout=math.inf)


def test_numpy_numbers_are_accepted_as_python_numbers() -> None:
    cfg = BatchConfig(items_per_batch=np.int64(4), agents=np.int32(2), timeout=np.float32(3))
    assert (cfg.items_per_batch, cfg.agents, cfg.timeout) == (4, 2, 3.0)
    assert type(cfg.items_per_batch) is int and type(cfg.timeout) is float
    out = dfbatch.process(pl.DataFrame({"text": ["a", "b"]}), upper,
                          items_per_batch=np.int64(1), **QUIET)
    assert out["output"].to_list() == ["A", "B"]


def test_columns_dict_is_converted_or_explained() -> None:
    out = dfbatch.process(pl.DataFrame({"text": ["a"]}), upper, columns={"output": "o"}, **QUIET)
    assert out["o"].to_list() == ["A"]
    assert BatchConfig(columns={"error": "err"}).columns == Columns(error="err")
    with pytest.raises(ConfigError, match=r"did you mean 'output'"):
        BatchConfig(columns={"outptu": "o"})
    with pytest.raises(ConfigError, match="Columns"):
        BatchConfig(columns=["output"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("typo", "hint"), [("progres", "progress"),
                                            ("checkpiont", "checkpoint"),
                                            ("retry_erors", "retry_errors")])
def test_process_keyword_typos_get_a_hint(typo: str, hint: str) -> None:
    fn = CountingFn()
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        dfbatch.process(pl.DataFrame({"text": ["a"]}), fn, **{typo: False})
    assert fn.rows == 0
