"""The dataset builders: pydocs (real stdlib docstrings) and synthetic workloads."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest

from dfbatch.plan._tokens import count_tokens, get_counter

ROOT = Path(__file__).resolve().parents[1] / "datasets"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"datasets_{name}", ROOT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synthetic = load("synthetic")


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, Path]:
    path = tmp_path_factory.mktemp("pydocs") / "pydocs.parquet"
    frame = load("build_pydocs").build(path)
    return frame, path


def test_pydocs_has_thousands_of_stdlib_documents(pydocs):
    frame, path = pydocs
    assert pl.read_parquet(path).equals(frame)
    assert frame.columns == ["id", "module", "name", "kind", "doc"]
    assert frame.schema["id"] == pl.Int64
    assert frame.height > 4000
    assert frame["id"].n_unique() == frame.height
    assert set(frame["kind"].unique()) == {"module", "class", "function", "method", "topic"}
    assert frame["doc"].str.len_chars().min() > 0  # type: ignore[operator]
    json_dumps = frame.filter((pl.col("module") == "json") & (pl.col("name") == "dumps"))
    assert json_dumps.height == 1 and "JSON" in json_dumps["doc"][0]
    assert frame.filter(pl.col("module").is_in(["this", "antigravity", "tkinter"])).height == 0
    lengths = frame["doc"].str.len_chars()
    assert lengths.max() > 20 * lengths.median()  # type: ignore[operator]  # a long tail


@pytest.mark.slow
def test_pydocs_is_deterministic(pydocs, tmp_path):
    frame, _ = pydocs
    again = load("build_pydocs").build(tmp_path / "again.parquet")
    assert again.equals(frame)


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "skewed", "constant"])
def test_synthetic_rows_have_exactly_their_target_tokens(dist):
    df = synthetic.generate(
        300, dist=dist, mean_tokens=40, low=5, high=200, oversize_tokens=900, seed=7
    )
    assert df.columns == ["id", "text", "target_tokens"] and df.height == 300
    for encoding in ("cl100k_base", "o200k_base"):
        counts = count_tokens(df["text"], encoding)
        assert (counts == df["target_tokens"]).all()
    assert synthetic.generate(
        300, dist=dist, mean_tokens=40, low=5, high=200, oversize_tokens=900, seed=7
    ).equals(df)


def test_synthetic_distributions_have_the_requested_shape():
    logn = synthetic.lengths(20_000, dist="lognormal", mean_tokens=200, high=10**6, seed=1)
    assert 180 < logn.mean() < 220 and logn.max() > 5 * 200
    uni = synthetic.lengths(20_000, dist="uniform", low=10, high=20, seed=1)
    assert set(uni.tolist()) == set(range(10, 21))
    skew = synthetic.lengths(1000, dist="skewed", mean_tokens=50, oversize_tokens=50_000, seed=1)
    assert (skew == 50_000).sum() == 10 and (skew[skew < 50_000]).max() <= 8000
    extra = synthetic.lengths(100, dist="constant", oversize_fraction=0.05, oversize_tokens=9)
    assert sorted(set(extra.tolist())) == [9, 200]
    with pytest.raises(ValueError, match="dist"):
        synthetic.lengths(10, dist="zipf")


def test_vocabulary_words_are_single_tokens():
    for encoding in ("cl100k_base", "o200k_base"):
        counter = get_counter(encoding, fast=False)
        assert counter(synthetic.WORDS).tolist() == [1] * len(synthetic.WORDS)
        assert counter([" " + w for w in synthetic.WORDS]).tolist() == [1] * len(synthetic.WORDS)


def test_synthetic_docstring_examples():
    assert doctest.testmod(synthetic, extraglobs={"generate": synthetic.generate}).failed == 0
