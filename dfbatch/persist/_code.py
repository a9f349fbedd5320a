"""What ``fn`` *is*, as a digest: its code and the values it captured, for the run fingerprint.

Two functions with the same name are the same fn for a checkpoint only if this digest agrees,
so a rerun with an edited lambda, another closure or another callable object of the same name
is refused instead of returning the old outputs. The digest covers:

- a Python function's code object: bytecode, constants (nested functions' code recursively),
  names; its defaults and keyword defaults; its closure cells' values; the module globals it
  reads (plain values by value, functions of the same module by their code, anything else by
  its type);
- ``functools.partial``: the function and its arguments; a bound method: the function and its
  object; a callable object: its class's ``__call__`` code and its attributes;
- an adapter's declared identity (``fn.dfbatch_fingerprint``, set by ``dfbatch.llm.chat`` and
  ``embed``): when fn declares one, it *is* fn's identity and its code is not read.

Values are taken by value when that is sure: None, booleans, numbers, str, bytes, tuples /
frozensets of such, enums, dataclasses, paths, dates, decimals, compiled regexes, NumPy arrays,
Polars frames, modules, classes and functions.
Mutable containers (list, dict, set) held by fn are taken as run state (a call log, a cache),
identified by their type only, and so are the attributes of a callable object that are not
plain values (a client, a lock). A value captured by a closure or a ``partial`` that has no
stable value (an arbitrary object, a C function outside a versioned package) makes fn
*unsure*: ``code_identity`` raises ``Unsure`` naming it, and the checkpoint refuses the run
rather than risk reusing another fn's outputs. The fix: declare what identifies fn with
``fn.dfbatch_fingerprint = {"version": 2}`` (bump it when fn changes what it returns).
Bytecode differs between Python versions: a checkpoint is reused within one Python version.

Examples
--------
>>> def make(word):
...     return lambda batch: [word] * batch.height
>>> same = code_identity(make("a")) == code_identity(make("a"))
>>> same, code_identity(make("a")) == code_identity(make("b"))
(True, False)
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import pathlib
import re
import sys
import types
import uuid
from collections.abc import Callable
from typing import Any

_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_MUTABLE = (list, dict, set, bytearray)
# immutable values whose repr is their value
_REPRS = (pathlib.PurePath, datetime.date, datetime.time, datetime.timedelta, datetime.tzinfo,
          decimal.Decimal, fractions.Fraction, uuid.UUID, re.Pattern, range, slice)
_MAX_DEPTH = 6


class Unsure(Exception):
    """fn's identity cannot be established for sure; ``args[0]`` says what and where."""


def code_identity(fn: Callable[..., Any]) -> str:
    """A hex digest of what ``fn`` is (see the module docstring); ``Unsure`` if unknowable."""
    h = hashlib.blake2b(digest_size=16)
    _Walker(h).callable(fn, "fn", 0)
    return h.hexdigest()


class _Walker:
    def __init__(self, h: Any) -> None:
        self.h = h
        self.seen: set[int] = set()

    def put(self, *parts: object) -> None:
        for p in parts:
            self.h.update(repr(p).encode() if not isinstance(p, bytes) else p)
            self.h.update(b"\x00")

    # -- callables ----------------------------------------------------------------------------
    def callable(self, fn: Any, where: str, depth: int) -> None:
        if id(fn) in self.seen:  # recursion (a function that calls itself)
            self.put("seen", callable_name(fn))
            return
        self.seen.add(id(fn))
        if depth > _MAX_DEPTH:
            self.put("deep", callable_name(fn))
            return
        declared = getattr(fn, "dfbatch_fingerprint", None)
        if declared is not None:
            self.put("declared", callable_name(fn))  # (the declared dict is in the fingerprint)
        elif isinstance(fn, functools.partial):
            self.put("partial")
            self.callable(fn.func, f"{where}.func", depth + 1)
            for i, arg in enumerate(fn.args):
                self.value(arg, f"{where} argument {i}", depth + 1, strict=True)
            for k in sorted(fn.keywords):
                self.put(k)
                self.value(fn.keywords[k], f"{where} argument {k!r}", depth + 1, strict=True)
        elif isinstance(fn, types.MethodType):
            self.put("method")
            self.callable(fn.__func__, where, depth + 1)
            self.state(fn.__self__, f"{where}.__self__", depth + 1)
        elif isinstance(fn, types.FunctionType):
            self.function(fn, where, depth)
        elif isinstance(fn, (types.BuiltinFunctionType, types.MethodDescriptorType,
                             types.WrapperDescriptorType, types.MethodWrapperType, type)):
            self.compiled(fn, where)
        elif callable(fn):  # a callable object: its class's __call__ and its state
            call = getattr(type(fn), "__call__", None)  # noqa: B004
            self.put("object", callable_name(type(fn)))
            if isinstance(call, types.FunctionType):
                self.function(call, f"{where}.__call__", depth + 1)
            else:
                self.compiled(fn, where)
            self.state(fn, where, depth + 1)
        else:
            msg = f"{where} ({type(fn).__name__}) is not callable"
            raise Unsure(msg)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        self.put("function", callable_name(fn))
        self.code(fn.__code__, where)
        for i, default in enumerate(fn.__defaults__ or ()):
            self.value(default, f"{where} default {i}", depth + 1, strict=True)
        for k, v in sorted((fn.__kwdefaults__ or {}).items()):
            self.put(k)
            self.value(v, f"{where} default {k!r}", depth + 1, strict=True)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            self.put(name)
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                self.put("<empty>")
                continue
            self.value(content, f"{where}'s closure variable {name!r}", depth + 1, strict=True)
        self.globals(fn, where, depth)

    def code(self, code: types.CodeType, where: str) -> None:
        self.put(code.co_code, code.co_names, code.co_freevars, code.co_argcount,
                 code.co_kwonlyargcount, code.co_flags)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, where)
            else:
                self.value(const, where, 0, strict=True)

    def globals(self, fn: types.FunctionType, where: str, depth: int) -> None:
        """The module globals ``fn`` reads: a changed constant or helper changes fn."""
        names = set(_names(fn.__code__))
        env = fn.__globals__
        for name in sorted(names):
            if name not in env:
                continue
            value = env[name]
            self.put(name)
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                self.callable(value, f"{where}'s global {name!r}", depth + 1)
            else:
                self.value(value, f"{where}'s global {name!r}", depth + 1, strict=False)

    def compiled(self, fn: Any, where: str) -> None:
        """A C function / class: its name, and its package's version outside the stdlib."""
        module = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", "")
        top = (module or "").partition(".")[0]
        if top == "builtins" or top in sys.stdlib_module_names:
            self.put("compiled", callable_name(fn), sys.version_info[:2])
            return
        version = getattr(sys.modules.get(top), "__version__", None)
        if version is None:
            msg = f"{where} is compiled code ({callable_name(fn)}) of an unversioned package"
            raise Unsure(msg)
        self.put("compiled", callable_name(fn), top, version)

    # -- values -------------------------------------------------------------------------------
    def state(self, obj: Any, where: str, depth: int) -> None:
        """An object's attributes: plain values by value, anything else by its type."""
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict):
            self.put("opaque", callable_name(type(obj)))
            return
        for k in sorted(attrs):
            self.put(k)
            self.value(attrs[k], f"{where}.{k}", depth + 1, strict=False)

    def value(self, v: Any, where: str, depth: int, *, strict: bool) -> None:
        if isinstance(v, _PLAIN):
            self.put(type(v).__name__, v)
        elif isinstance(v, enum.Enum):
            self.put("enum", callable_name(type(v)), v.name)
        elif isinstance(v, _REPRS):
            self.put(callable_name(type(v)), repr(v))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            self.put("dataclass", callable_name(type(v)))
            for f in dataclasses.fields(v):
                self.put(f.name)
                self.value(getattr(v, f.name), f"{where}.{f.name}", depth + 1, strict=strict)
        elif isinstance(v, (tuple, frozenset)):
            items = sorted(v, key=repr) if isinstance(v, frozenset) else v
            self.put(type(v).__name__, len(items))
            for i, item in enumerate(items):
                self.value(item, f"{where}[{i}]", depth + 1, strict=strict)
        elif isinstance(v, _MUTABLE):
            self.put("state", type(v).__name__)  # run state (a log, a cache): type only
        elif isinstance(v, types.ModuleType):
            self.put("module", v.__name__)
        elif isinstance(v, type):
            self.put("class", callable_name(v))
        elif inspect.isroutine(v) or isinstance(v, functools.partial):
            self.callable(v, where, depth + 1)
        elif _is_data(v):
            self.put("data", _data_digest(v))
        elif getattr(v, "dfbatch_fingerprint", None) is not None:
            declared = repr(getattr(v, "dfbatch_fingerprint", None))
            self.put("declared", callable_name(type(v)), declared)
        elif strict:
            msg = f"{where} holds a {callable_name(type(v))}, which has no stable value"
            raise Unsure(msg)
        else:
            self.put("object", callable_name(type(v)))


def _names(code: types.CodeType) -> list[str]:
    out = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out += _names(const)
    return out


def _is_data(v: Any) -> bool:
    mod = type(v).__module__ or ""
    return mod.startswith(("numpy", "polars")) and hasattr(v, "shape")


def _data_digest(v: Any) -> str:
    import numpy as np
    import polars as pl

    h = hashlib.blake2b(digest_size=16)
    if isinstance(v, pl.Series):
        v = v.to_frame()
    if isinstance(v, pl.DataFrame):
        h.update(repr(v.schema).encode())
        h.update(np.ascontiguousarray(v.hash_rows(seed=7).to_numpy()).tobytes())
    elif isinstance(v, np.ndarray) and v.dtype != object:
        h.update(repr((v.dtype.str, v.shape)).encode())
        h.update(np.ascontiguousarray(v).tobytes())
    else:
        h.update(repr(v).encode())
    return h.hexdigest()


def callable_name(obj: Any) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    qual = getattr(obj, "__qualname__", None)
    if not isinstance(qual, str):
        obj = type(obj)
        qual = obj.__qualname__
    return f"{getattr(obj, '__module__', None) or 'builtins'}.{qual}"
