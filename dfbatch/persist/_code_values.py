"""The values fn captured, for ``dfbatch.persist._code``: by value when that is sure.

``ValueWalker`` hashes a value: plain values, enums, dataclasses, tuples, paths, dates and the
like by value; lists, dicts and sets by their content (up to ``MAX_ITEMS`` items of such
values); NumPy arrays and Polars frames by a digest of their data; an object's attributes
(``state``) plain ones by value and others by their type. A value with no stable value is
``Unsure`` where the walk is strict (a closure cell, a ``partial``'s argument). Functions and
classes found among the values are handed back to the code walker (``_code._Walker``).

>>> import hashlib
>>> h = hashlib.blake2b(digest_size=8)
>>> ValueWalker(h).value({"a": (1, 2.5)}, "x", 0, strict=True)
>>> len(h.hexdigest())
16
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
import types
import uuid
from typing import Any

PLAIN = (type(None), bool, int, float, complex, str, bytes)
MUTABLE = (list, dict, set, bytearray)
# immutable values whose repr is their value
REPRS = (pathlib.PurePath, datetime.date, datetime.time, datetime.timedelta, datetime.tzinfo,
         decimal.Decimal, fractions.Fraction, uuid.UUID, re.Pattern, range, slice)
MAX_DEPTH = 6
MAX_ITEMS = 10_000  # elements of one container taken by value; beyond that fn is unsure


class Unsure(Exception):
    """fn's identity cannot be established for sure; ``args[0]`` says what and where."""


class ValueWalker:
    """Feeds values into a hash; ``seen`` guards against cycles."""

    def __init__(self, h: Any) -> None:
        self.h = h
        self.seen: set[int] = set()

    def put(self, *parts: object) -> None:
        for p in parts:
            self.h.update(repr(p).encode() if not isinstance(p, bytes) else p)
            self.h.update(b"\x00")

    def callable(self, fn: Any, where: str, depth: int) -> None:
        """A function found among the values: the code walker (``_code._Walker``) hashes it."""
        raise NotImplementedError

    def klass(self, cls: type, where: str, depth: int) -> None:
        """A class found among the values: the code walker (``_code._Walker``) hashes it."""
        raise NotImplementedError

    def state(self, obj: Any, where: str, depth: int, written: set[str]) -> None:
        """An object's attributes: plain values by value, anything else by its type.

        A list / dict / set attribute the method writes (``self.calls.append``) is run state.
        """
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict):
            self.put("opaque", callable_name(type(obj)))
            return
        for k in sorted(attrs):
            self.put(k)
            if k in written and isinstance(attrs[k], MUTABLE):
                self.put("state", type(attrs[k]).__name__)
            else:
                self.value(attrs[k], f"{where}.{k}", depth + 1, strict=False)

    def value(self, v: Any, where: str, depth: int, *, strict: bool) -> None:
        if isinstance(v, PLAIN):
            self.put(type(v).__name__, v)
        elif isinstance(v, enum.Enum):
            self.put("enum", callable_name(type(v)), v.name)
        elif isinstance(v, REPRS):
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
        elif isinstance(v, MUTABLE):
            self.container(v, where, depth)
        elif isinstance(v, types.ModuleType):
            self.put("module", v.__name__)
        elif isinstance(v, type):
            self.klass(v, where, depth + 1)
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

    def container(self, v: list[Any] | dict[Any, Any] | set[Any] | bytearray, where: str,
                  depth: int) -> None:
        """A list / dict / set by its content; unsure when too large or holding objects."""
        if isinstance(v, bytearray):
            self.put("bytearray", bytes(v))
            return
        if len(v) > MAX_ITEMS or depth > MAX_DEPTH:
            msg = (f"{where} is a {type(v).__name__} of {len(v)} items, too large (or too deep) "
                   f"to take by value")
            raise Unsure(msg)
        if id(v) in self.seen:
            msg = f"{where} is a {type(v).__name__} that contains itself"
            raise Unsure(msg)
        self.seen.add(id(v))
        self.put(type(v).__name__, len(v))
        if isinstance(v, dict):
            for i, (k, item) in enumerate(v.items()):
                self.value(k, f"{where} key {i}", depth + 1, strict=True)
                self.value(item, f"{where}[{k!r}]", depth + 1, strict=True)
        else:
            items = sorted(v, key=repr) if isinstance(v, set) else v
            for i, item in enumerate(items):
                self.value(item, f"{where}[{i}]", depth + 1, strict=True)
        self.seen.discard(id(v))


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
