"""What ``fn`` *is*, as a digest: its code and the values it captured, for the run fingerprint.

Two functions with the same name are the same fn for a checkpoint only if this digest agrees,
so a rerun with an edited lambda, another closure or another callable object of the same name
is refused instead of returning the old outputs. The digest covers:

- a Python function's code object: bytecode, constants (nested functions' code recursively),
  names; its defaults and keyword defaults; its closure cells' values; the module globals it
  reads (plain values by value, functions by their code, anything else by its type), and the
  attributes it reads of the user's own modules (``mycfg.PREFIX``, ``mycfg.tag(t)``);
- the user's classes fn uses (``Helper.go(t)``, a callable object's class): their plain
  attributes by value and their methods by their code;
- ``functools.partial``: the function and its arguments; a bound method: the function and its
  object; a callable object: its class's ``__call__`` code and its attributes;
- an adapter's declared identity (``fn.dfbatch_fingerprint``, set by ``dfbatch.llm.chat`` and
  ``embed``): when fn declares one, it *is* fn's identity and its code is not read.

Values are taken by value when that is sure: None, booleans, numbers, str, bytes, tuples /
frozensets of such, enums, dataclasses, paths, dates, decimals, compiled regexes, NumPy arrays,
Polars frames, modules, classes and functions.
Lists, dicts and sets are taken by their content (up to 10,000 items of such values, else fn
is *unsure*), except those fn's code writes to (``calls.append(n)``, ``cache[k] = v``,
``self.log.append(x)``): those are run state (a call log, a cache), identified by their type
only, and so are the attributes of a callable object that are not
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

import functools
import hashlib
import re
import sys
import types
from collections.abc import Callable
from typing import Any

from dfbatch.persist._bytecode import _attr_chains, _self_written, _written
from dfbatch.persist._code_values import MAX_DEPTH, MUTABLE, Unsure, ValueWalker, callable_name

__all__ = ["Unsure", "callable_name", "code_identity"]

# class attributes that are Python's bookkeeping, not state fn reads
_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__",
                         "__annotations__", "__slots__", "__dataclass_fields__",
                         "__dataclass_params__", "__match_args__", "__orig_bases__",
                         "__parameters__", "__abstractmethods__", "_abc_impl"})


def code_identity(fn: Callable[..., Any]) -> str:
    """A hex digest of what ``fn`` is (see the module docstring); ``Unsure`` if unknowable."""
    h = hashlib.blake2b(digest_size=16)
    _Walker(h).callable(fn, "fn", 0)
    return h.hexdigest()


class _Walker(ValueWalker):
    """Feeds what fn is into a hash: its code, defaults, closure, globals, classes."""

    def callable(self, fn: Any, where: str, depth: int) -> None:
        if id(fn) in self.seen:  # recursion (a function that calls itself)
            self.put("seen", callable_name(fn))
            return
        self.seen.add(id(fn))
        if depth > MAX_DEPTH:
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
            owner = fn.__self__ if isinstance(fn.__self__, type) else type(fn.__self__)
            self.klass(owner, f"{where}'s class", depth + 1)
            func = fn.__func__
            written = _self_written(func) if isinstance(func, types.FunctionType) else set()
            self.state(fn.__self__, f"{where}.__self__", depth + 1, written)
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
                self.klass(type(fn), f"{where}'s class", depth + 1)
            else:
                self.compiled(fn, where)
            self.state(fn, where, depth + 1,
                       _self_written(call) if isinstance(call, types.FunctionType) else set())
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
            if isinstance(content, MUTABLE) and (name,) in _written(fn.__code__):
                self.put("state", type(content).__name__)  # fn writes it: a log, a cache
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
            if isinstance(value, MUTABLE) and (name,) in _written(fn.__code__):
                self.put("state", type(value).__name__)  # fn writes it: a log, a cache
            elif isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                self.callable(value, f"{where}'s global {name!r}", depth + 1)
            elif isinstance(value, types.ModuleType) and _is_user_module(value):
                self.put("module", value.__name__)
                self.module_attrs(value, _attr_chains(fn.__code__, name), f"{where}'s {name}",
                                  depth + 1)
            else:
                self.value(value, f"{where}'s global {name!r}", depth + 1, strict=False)

    def module_attrs(self, module: types.ModuleType, chains: set[tuple[str, ...]], where: str,
                     depth: int) -> None:
        """The attributes of a user module that fn reads (``mycfg.PREFIX``, ``mycfg.tag(t)``)."""
        for chain in sorted(chains):
            obj: Any = module
            for i, attr in enumerate(chain):
                if not isinstance(obj, types.ModuleType):
                    break
                if not _is_user_module(obj):
                    self.value(obj, where, depth, strict=False)
                    break
                self.put(attr)
                obj = getattr(obj, attr, _MISSING)
                if obj is _MISSING:
                    self.put("<missing>")
                    break
                if i == len(chain) - 1 or not isinstance(obj, types.ModuleType):
                    self.value(obj, f"{where}.{'.'.join(chain[:i + 1])}", depth + 1,
                               strict=False)

    def klass(self, cls: type, where: str, depth: int) -> None:
        """A user class fn uses: its plain attributes by value and its methods by their code."""
        if id(cls) in self.seen or not _is_user_module(sys.modules.get(cls.__module__)):
            self.put("class", callable_name(cls))
            return
        self.seen.add(id(cls))
        self.put("class", callable_name(cls))
        if depth > MAX_DEPTH:
            return
        for base in cls.__bases__:
            if base is not object:
                self.klass(base, f"{where} base {base.__name__}", depth + 1)
        for k, v in sorted(vars(cls).items()):
            dunder = k.startswith("__") and k.endswith("__")
            if k in ("__annotations__", "__pydantic_fields__"):  # fields: types, defaults
                self.put(k, re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v)))
                continue
            if k in _CLASS_SKIP or (dunder and not isinstance(v, types.FunctionType)):
                continue  # Python's or a framework's bookkeeping (pydantic's schema ...)
            self.put(k)
            if isinstance(v, (staticmethod, classmethod)):
                v = v.__func__
            if isinstance(v, property):
                for part in (v.fget, v.fset, v.fdel):
                    if part is not None:
                        self.callable(part, f"{where}.{k}", depth + 1)
            elif isinstance(v, types.FunctionType):
                self.callable(v, f"{where}.{k}", depth + 1)
            else:
                self.value(v, f"{where}.{k}", depth + 1, strict=False)

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


_MISSING = object()


def _is_user_module(module: types.ModuleType | None) -> bool:
    """Code of the user's own (unversioned) modules; not the stdlib, site-packages or dfbatch."""
    if module is None:
        return False
    top = module.__name__.partition(".")[0]
    if top in ("builtins", "dfbatch") or top in sys.stdlib_module_names:
        return False
    path = getattr(sys.modules.get(top), "__file__", None) or ""
    return "site-packages" not in path and "dist-packages" not in path


def _names(code: types.CodeType) -> list[str]:
    out = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out += _names(const)
    return out
