"""Exact token counts of a text column, once per distinct text; cutting texts to a budget.

A counter is tiktoken (its encodings load offline, see ``_encodings``), or a callable whose
output is checked. A faster exact counter, ``toktok`` (package ``toktok-rs``), is used for the
canonical encodings when it is installed and agrees with tiktoken on a probe set;
``DFBATCH_FAST_TOKENS=0`` or ``fast=False`` forces tiktoken.

Examples
--------
>>> import polars as pl
>>> from dfbatch.plan._tokens import count_tokens
>>> count_tokens(pl.Series("text", ["hello world", None, "hello world", ""]))
shape: (4,)
Series: 'text' [u32]
[
    2
    0
    2
    0
]
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import cpu_cores
from dfbatch.errors import TokenizerError
from dfbatch.plan._encodings import encoding_name, load_tiktoken, seed_tiktoken_cache

__all__ = [
    "CountFn",
    "TokenCounter",
    "TokenSpec",
    "count_tokens",
    "get_counter",
    "seed_tiktoken_cache",
    "truncate",
]

CountFn = Callable[[list[str]], Any]
TokenSpec = str | CountFn

_UINT32_MAX = np.iinfo(np.uint32).max
_CHUNK = 1 << 16  # texts per encode_ordinary_batch call: bounds the memory of the id lists
_FAST_ENV = "DFBATCH_FAST_TOKENS"
_lock = threading.Lock()
_counters: dict[tuple[str, bool], TokenCounter] = {}

# Strings the fast counter must count exactly like tiktoken before dfbatch trusts it.
_PROBE = [
    "",
    "hello world",
    "  leading and trailing   ",
    "naïve café déjà vu — “quotes” ½ ∑ ∞",
    "emoji 👩‍👩‍👧‍👦 🧠🚀 flags 🇫🇷🇯🇵",
    "汉字かなカナ한국어 العربية עברית हिन्दी ไทย",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # 1234567890\r\n",
    "tabs\t\tand\n\n\nnewlines \x00\x01\x1b[0m control",
    "<|endoftext|> is ordinary text here",
    "don't I'LL they've WE'RE",
    " " * 50 + "x" + "\n" * 7,
]


@dataclass(frozen=True)
class TokenCounter:
    """A callable ``list[str] -> np.ndarray[uint32]`` of token counts, one per text, in order.

    ``name`` is the spec it was built from; ``backend`` is ``"tiktoken"``, ``"toktok"`` or
    ``"callable"``.
    """

    name: str
    backend: str
    fn: Callable[[list[str]], np.ndarray]

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.uint32)
        return self.fn(texts)


def _tiktoken_fn(enc: Any) -> Callable[[list[str]], np.ndarray]:
    threads = cpu_cores()

    def count(texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.uint32)
        for start in range(0, len(texts), _CHUNK):
            ids = enc.encode_ordinary_batch(texts[start : start + _CHUNK], num_threads=threads)
            out[start : start + len(ids)] = np.fromiter(map(len, ids), np.uint32, len(ids))
        return out

    return count


def _toktok_fn(name: str, reference: Callable[[list[str]], np.ndarray]) -> Any:
    """toktok's counter for ``name`` if installed and exact on the probe set, else None."""
    if importlib.util.find_spec("toktok") is None:
        return None
    import toktok

    threads = cpu_cores()

    def count(texts: list[str]) -> np.ndarray:
        return np.asarray(toktok.batch_count(texts, name, threads=threads), dtype=np.uint32)

    try:
        same = np.array_equal(count(_PROBE), reference(_PROBE))
    except Exception:  # unknown encoding in this toktok version, API change, ...
        return None
    return count if same else None


def _fast_default(fast: bool | None) -> bool:
    if fast is not None:
        return fast
    return os.environ.get(_FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _callable_counter(fn: CountFn) -> TokenCounter:
    label = getattr(fn, "__qualname__", None) or repr(fn)

    def count(texts: list[str]) -> np.ndarray:
        return _validate_counts(fn(texts), len(texts), label)

    return TokenCounter(label, "callable", count)


def _validate_counts(raw: Any, n: int, label: str) -> np.ndarray:
    try:
        arr = np.asarray(raw.to_numpy() if isinstance(raw, pl.Series) else raw)
    except Exception as e:
        msg = f"token counter {label} returned {type(raw).__name__}, expected a list of ints"
        raise TokenizerError(msg) from e
    if arr.ndim != 1 or len(arr) != n:
        got = f"{len(arr)} counts" if arr.ndim == 1 else f"{type(raw).__name__} {raw!r:.40}"
        msg = f"token counter {label} returned {got} for {n} texts; expected one count per text"
        raise TokenizerError(msg)
    if n and (arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr))):
        msg = f"token counter {label} returned {arr.dtype} values; expected non-negative ints"
        raise TokenizerError(msg)
    if n and (arr.min() < 0 or arr.max() > _UINT32_MAX or np.any(arr != np.floor(arr))):
        msg = f"token counter {label} returned a count outside 0..{_UINT32_MAX} or a fraction"
        raise TokenizerError(msg)
    return arr.astype(np.uint32)


def get_counter(spec: TokenSpec = "cl100k_base", *, fast: bool | None = None) -> TokenCounter:
    """Return the token counter for an encoding name, a model name, or a callable.

    Parameters
    ----------
    spec
        A tiktoken encoding (``"cl100k_base"``), a model (``"gpt-4o"``), or a callable
        ``list[str] -> counts`` (its output is checked: one non-negative int per text).
    fast
        Use ``toktok`` for the canonical encodings when installed (exact; checked against
        tiktoken). ``None`` reads ``DFBATCH_FAST_TOKENS`` (default on).

    Examples
    --------
    >>> from dfbatch.plan._tokens import get_counter
    >>> get_counter("gpt-4o", fast=False)(["hello world", "🧠"]).tolist()
    [2, 3]
    >>> get_counter(lambda texts: [len(t) for t in texts])(["abc"]).tolist()
    [3]
    """
    if callable(spec):
        return _callable_counter(spec)
    if not isinstance(spec, str):
        msg = f"encoding must be an encoding name, a model name or a callable, got {spec!r}"
        raise TokenizerError(msg)
    use_fast = _fast_default(fast)
    key = (spec, use_fast)
    with _lock:
        if key not in _counters:
            name = encoding_name(spec)
            reference = _tiktoken_fn(load_tiktoken(name))
            fast_fn = _toktok_fn(name, reference) if use_fast else None
            backend = "toktok" if fast_fn is not None else "tiktoken"
            _counters[key] = TokenCounter(name, backend, fast_fn or reference)
        return _counters[key]


def count_tokens(
    series: pl.Series, spec: TokenSpec = "cl100k_base", *, fast: bool | None = None
) -> pl.Series:
    """Exact token count of each text (UInt32); nulls count 0. Each distinct text is counted once
    (a column of over 65,536 texts that hardly repeat is counted row by row: no hash table).

    Examples
    --------
    >>> import polars as pl
    >>> from dfbatch.plan._tokens import count_tokens
    >>> s = pl.Series("doc", ["a b c", None, "a b c", "xyz"])
    >>> count_tokens(s, lambda texts: [len(t.split()) for t in texts]).to_list()
    [3, 0, 3, 1]
    """
    if series.dtype not in (pl.String, pl.Null):
        msg = (
            f"count_tokens needs a String series, got {series.name!r} of dtype {series.dtype}; "
            "cast it first, e.g. series.cast(pl.String)"
        )
        raise TokenizerError(msg)
    counter = get_counter(spec, fast=fast)
    if len(series) > _CHUNK and int(series.approx_n_unique()) > 0.9 * len(series):  # type: ignore[arg-type]
        # a large column of (almost) distinct texts: counted row by row, a chunk at a time (a
        # hash table of a million texts would take more memory than they do)
        return pl.Series(series.name, _counts(counter, series), dtype=pl.UInt32)
    distinct = series.drop_nulls().unique()
    if len(distinct) == 0:
        return pl.Series(series.name, np.zeros(len(series), np.uint32), dtype=pl.UInt32)
    counts = pl.Series(_counts(counter, distinct), dtype=pl.UInt32)
    return series.replace_strict(distinct, counts, default=0, return_dtype=pl.UInt32)


def _counts(counter: TokenCounter, texts: pl.Series) -> np.ndarray:
    """``counter`` over ``texts`` a chunk at a time: a million Python strings at once would
    cost more memory than the frame. A null counts 0."""
    out = np.zeros(len(texts), np.uint32)
    for at in range(0, len(texts), _CHUNK):
        chunk = texts.slice(at, _CHUNK)
        keep = chunk.is_not_null().to_numpy()
        if keep.any():
            out[at:at + len(chunk)][keep] = counter(chunk.filter(keep).to_list())
    return out


def truncate(
    series: pl.Series, max_tokens: int, spec: TokenSpec = "cl100k_base", *, fast: bool | None = None
) -> pl.Series:
    """Cut each text to its longest prefix of at most ``max_tokens`` tokens; nulls stay null.

    Only texts over the budget change. Prefixes are found by bisection over character lengths,
    all texts at once (about ``log2(length)`` counter calls), so the cut is exact for any
    counter and always lands on a character boundary.

    Examples
    --------
    >>> import polars as pl
    >>> from dfbatch.plan._tokens import truncate
    >>> truncate(pl.Series(["hello big world", None, "hi"]), 2, fast=False).to_list()
    ['hello big', None, 'hi']
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        msg = f"max_tokens must be an integer >= 0, got {max_tokens!r}"
        raise TokenizerError(msg)
    counter = get_counter(spec, fast=fast)
    over = np.flatnonzero(count_tokens(series, spec, fast=fast).to_numpy() > max_tokens)
    if len(over) == 0:
        return series
    texts: list[str] = series.gather(over).to_list()
    lo = np.zeros(len(texts), dtype=np.int64)  # a prefix of lo chars fits
    hi = np.array([len(t) for t in texts], dtype=np.int64)  # ... of hi chars does not
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        fits = counter([t[:m] for t, m in zip(texts, mid.tolist(), strict=True)]) <= max_tokens
        lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid)
    cut = [t[:m] for t, m in zip(texts, lo.tolist(), strict=True)]
    return series.clone().scatter(over, pl.Series(cut, dtype=pl.String))
