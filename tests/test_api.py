"""The public surface: a sorted, complete ``__all__`` and an import with no optional extras."""

from __future__ import annotations

import subprocess
import sys
import types

import polars as pl

import dfbatch


def test_all_is_sorted_and_complete() -> None:
    assert dfbatch.__all__ == sorted(dfbatch.__all__)
    public = {
        name for name, value in vars(dfbatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__
    }
    assert public | {"__version__"} == set(dfbatch.__all__)
    for name in dfbatch.__all__:
        assert hasattr(dfbatch, name), name


def test_import_registers_namespaces_and_loads_no_optional_dependency() -> None:
    code = (
        "import sys, dfbatch, polars as pl; "
        "assert hasattr(pl.DataFrame({'a': [1]}), 'batch'); "
        "assert hasattr(pl.LazyFrame({'a': [1]}), 'batch'); "
        "heavy = ['ipywidgets', 'matplotlib', 'openai', 'ray', 'aiohttp', 'tqdm', "
        "'nest_asyncio2']; "
        "print([m for m in heavy if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert res.stdout.strip() == "[]"


def test_namespace_forwards_to_the_typed_functions() -> None:
    df = pl.DataFrame({"text": ["a b", "c"]})
    words = lambda ts: [len(t.split()) for t in ts]  # noqa: E731
    via_namespace = df.batch.plan(encoding=words, agents=1)
    assert via_namespace.equals(dfbatch.plan(df, encoding=words, agents=1))
