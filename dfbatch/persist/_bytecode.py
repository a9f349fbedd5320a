"""What a function's bytecode reads and writes, for ``dfbatch.persist._code``.

>>> def fn(b):
...     log.append(len(b))
...     return [cfg.PREFIX + t for t in b]
>>> sorted(_written(fn.__code__)), sorted(_attr_chains(fn.__code__, "cfg"))
([('log',)], [('PREFIX',)])
"""

from __future__ import annotations

import dis
import functools
import types

__all__ = ["_attr_chains", "_self_written", "_written"]


def _attr_chains(code: types.CodeType, name: str) -> set[tuple[str, ...]]:
    """The attribute chains read from the global ``name`` (``name.a.b`` -> ``("a", "b")``)."""
    chains: set[tuple[str, ...]] = set()
    chain: list[str] | None = None
    for ins in dis.get_instructions(code):
        if chain is not None and ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            chain.append(str(ins.argval))
            continue
        if chain:
            chains.add(tuple(chain))
        chain = [] if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval == name else None
    if chain:
        chains.add(tuple(chain))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            chains |= _attr_chains(const, name)
    return chains


_WRITES = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop",
                     "popitem", "clear", "remove", "discard", "__setitem__", "__delitem__"})
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST", "LOAD_CLASSDEREF"})
_SIMPLE = _LOADS | {"LOAD_CONST"}


@functools.lru_cache(maxsize=512)
def _written(code: types.CodeType) -> frozenset[tuple[str, ...]]:
    """The containers ``code`` writes: ``log.append(x)``, ``cache[k] = v``, ``self.n.add(x)``.

    Each as its load chain (``("log",)``, ``("self", "n")``); those are run state (a call log,
    a cache) and taken by type; a container that is only read is taken by its content.
    """
    out: set[tuple[str, ...]] = set()
    ins = list(dis.get_instructions(code))
    for i, first in enumerate(ins):
        if first.opname not in _LOADS:
            continue
        chain = [str(first.argval)]
        j = i + 1
        while j < len(ins) and ins[j].opname in ("LOAD_ATTR", "LOAD_METHOD"):
            if ins[j].argval in _WRITES:
                out.add(tuple(chain))
                break
            chain.append(str(ins[j].argval))
            j += 1
        else:
            if (j + 1 < len(ins) and ins[j].opname in _SIMPLE
                    and ins[j + 1].opname in ("STORE_SUBSCR", "DELETE_SUBSCR")):
                out.add(tuple(chain))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _written(const)
    return frozenset(out)


def _self_written(method: types.FunctionType) -> set[str]:
    """The attributes of ``self`` that ``method`` writes to (``self.calls.append(...)``)."""
    code = method.__code__
    if not code.co_argcount:
        return set()
    me = code.co_varnames[0]
    return {chain[1] for chain in _written(code) if len(chain) == 2 and chain[0] == me}
