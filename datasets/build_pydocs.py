"""Build ``datasets/pydocs.parquet``: the docstrings of the running Python's standard library.

Real English technical text with a long-tailed length distribution, no third-party text (the
Python documentation is under the PSF licence). One row per documented module, class, function
and method of the public standard library (found with ``inspect``), plus the language reference
topics of ``pydoc_data.topics``.

Columns: ``id`` (Int64, a stable hash of kind + module + name), ``module``, ``name`` (qualified),
``kind`` (module / class / function / method / topic), ``doc`` (cleaned docstring). Rows are
sorted by (module, name, kind), so the same Python version always gives the same file.

Modules are imported in a subprocess (``python -I -W ignore``) so their import side effects
(warnings, prints, threads) never touch the caller.

Run ``python datasets/build_pydocs.py [PATH]`` or call ``build(path)``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent / "pydocs.parquet"
_TIMEOUT_S = 300
# GUI, side effects on import (print, browser), platform-specific, or test suites
_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "msilib",
    "winreg",
    "winsound",
    "nt",
    "msvcrt",
    "__main__",
    "__hello__",
    "__phello__",
    "_osx_support",
    "distutils",
}
_SKIP_PARTS = {"__main__", "test", "tests", "idle_test"}


def build(path: str | os.PathLike[str] = DEFAULT_PATH) -> Any:
    """Collect the documents (in a subprocess) and write them to ``path``; returns the frame."""
    import polars as pl

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docs.jsonl"
        cmd = [
            sys.executable,
            "-I",
            "-W",
            "ignore",
            str(Path(__file__).resolve()),
            "--collect",
            str(out),
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            msg = f"collecting stdlib docs failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            raise RuntimeError(msg)
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    schema = {
        "id": pl.Int64,
        "module": pl.String,
        "name": pl.String,
        "kind": pl.String,
        "doc": pl.String,
    }
    frame = pl.DataFrame(rows, schema=schema, orient="row").sort("module", "name", "kind")
    if frame["id"].n_unique() != frame.height:
        msg = "document ids collide; this should not happen"
        raise RuntimeError(msg)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(target, statistics=False)
    return frame


# -- runs in the subprocess: standard library only -------------------------------------------
def _stable_id(kind: str, module: str, name: str) -> int:
    digest = hashlib.blake2b(f"{kind}:{module}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _module_names() -> list[str]:
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIP:
            continue
        names.add(top)
        try:
            module = __import__(top)
        except BaseException:  # absent on this platform, needs a display, ...
            continue
        for info in pkgutil.walk_packages(
            getattr(module, "__path__", []), prefix=f"{top}.", onerror=lambda _: None
        ):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in _SKIP_PARTS for p in parts):
                names.add(info.name)
    return sorted(names)


def _own_doc(obj: Any) -> str | None:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def _documents(modname: str, module: Any) -> list[tuple[str, str, str]]:
    """(kind, qualified name, doc) for the module and what it defines."""
    out = []
    doc = _own_doc(module)
    if doc:
        out.append(("module", modname, doc))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _defined_here(obj, modname):
            continue
        if isinstance(obj, type):
            doc = _own_doc(obj)
            if doc:
                out.append(("class", name, doc))
            out += _methods(name, obj)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = _own_doc(obj)
            if doc:
                out.append(("function", name, doc))
    return out


def _defined_here(obj: Any, modname: str) -> bool:
    """Defined by this module, or by its private implementation module (``_heapq`` ...)."""
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    return owner == modname or (owner.startswith("_") and owner.lstrip("_") in modname)


def _methods(cls_name: str, cls: type) -> list[tuple[str, str, str]]:
    out = []
    for name, attr in sorted(cls.__dict__.items()):
        if name.startswith("_"):
            continue
        func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
        if isinstance(func, property):
            func = func.fget
        if callable(func) or inspect.isdatadescriptor(attr):
            doc = _own_doc(func)
            if doc:
                out.append(("method", f"{cls_name}.{name}", doc))
    return out


def _collect(out_path: str) -> None:
    import importlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    seen: set[tuple[str, str]] = set()
    real_stdout = sys.stdout
    with open(out_path, "w", encoding="utf-8") as out:
        for modname in _module_names():
            sys.stdout = io.StringIO()  # swallow prints done on import
            try:
                module = importlib.import_module(modname)
                docs = _documents(modname, module)
            except BaseException:  # any module may fail to import here
                continue
            finally:
                sys.stdout = real_stdout
            for kind, name, doc in docs:
                if (modname, name) in seen:
                    continue
                seen.add((modname, name))
                row = [_stable_id(kind, modname, name), modname, name, kind, doc]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        from pydoc_data.topics import topics

        for name, doc in sorted(topics.items()):
            if doc.strip():
                row = [
                    _stable_id("topic", "pydoc_data.topics", name),
                    "pydoc_data.topics",
                    name,
                    "topic",
                    doc.strip(),
                ]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--collect":
        _collect(argv[1])
        return
    path = Path(argv[0]) if argv else DEFAULT_PATH
    t0 = time.perf_counter()
    frame = build(path)
    lengths = frame["doc"].str.len_chars()
    print(
        f"wrote {path}: {frame.height} documents, median {lengths.median():.0f} chars, "
        f"max {lengths.max()} chars, in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
