"""The run fingerprint: what identifies a run, and what differs between two runs.

A run is identified by its input rows (the ``key`` column's values as a set if given, else
content hashes of every input column, in order), the fn's identity (qualified name,
``functools.partial`` arguments, a digest of its code and captured values, see
``dfbatch.persist._code``, and the ``fn.dfbatch_fingerprint`` dict the llm adapters set with
their model and prompt) and the config that changes outputs (text, output column names,
``oversize``, ``token_limit``, ``encoding``, ``request_overhead_tokens``,
``output_tokens_per_row``). ``items_per_batch``, agents and limits do not change the outputs of a
pure fn and may change between runs. Another fingerprint is a ``CheckpointError`` that says what
differs, unless ``resume="overwrite"``. Row hashes use polars' ``hash_rows``, which is stable
within a polars version: upgrading polars mid-run makes an unkeyed checkpoint unusable (the
error says so); pass ``key=`` to be independent of it. ``hash_rows`` takes ``-0.0`` for
``0.0`` and one NaN for another: rows holding such a value are told apart by its bits.

``dfbatch.persist._checkpoint`` stores a run's fingerprint in its manifest and refuses a rerun whose
fingerprint differs (``mismatch_error``).

Examples
--------
>>> import polars as pl
>>> from dfbatch.config import BatchConfig
>>> from dfbatch.persist._fingerprint import fingerprint
>>> df = pl.DataFrame({"text": ["a", "b"]})
>>> then = fingerprint(df, str.upper, "text", BatchConfig())
>>> now = fingerprint(df, str.lower, "text", BatchConfig(token_limit=100))
>>> now.differences(then.as_dict())
['fn: builtins.str.upper then, builtins.str.lower now', 'token_limit: 32768 then, 100 now']
>>> fingerprint(df, str.upper, "text", BatchConfig()).digest == then.digest
True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dfbatch.config import BatchConfig
from dfbatch.errors import CheckpointError, ConfigError
from dfbatch.persist._code import Unsure, callable_name, code_identity

HASH_COLUMN = "__dfbatch_hash"  # the name of ``row_ids``'s Series when there is no key
_HASH = HASH_COLUMN


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies a run: input rows, fn identity, output-affecting config.

    >>> import polars as pl
    >>> from dfbatch.config import BatchConfig
    >>> fp = fingerprint(pl.DataFrame({"text": ["a"]}), str.upper, "text", BatchConfig())
    >>> fp.n_rows, fp.fn["name"], len(fp.digest)
    (1, 'builtins.str.upper', 32)
    """

    rows: str
    n_rows: int
    key: str | None
    fn: Mapping[str, Any]
    config: Mapping[str, Any]

    @property
    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, old: Mapping[str, Any]) -> list[str]:
        """Human-readable differences from a fingerprint stored in a manifest."""
        out = []
        if old.get("key") != self.key:
            out.append(f"key: {old.get('key')!r} then, {self.key!r} now")
        if old.get("rows") != self.rows:
            out.append(f"input rows differ ({old.get('n_rows')} rows then, {self.n_rows} now)")
        if old.get("fn") != self.fn:
            out.append(_fn_change(old.get("fn"), self.fn))
        old_cfg = old.get("config") or {}
        for name in sorted(set(old_cfg) | set(self.config)):
            if old_cfg.get(name) != self.config.get(name):
                out.append(f"{name}: {old_cfg.get(name)!r} then, {self.config.get(name)!r} now")
        return out


def fingerprint(
    df: pl.DataFrame, fn: Callable[..., Any], text: str | pl.Expr, cfg: BatchConfig,
    *, key: str | None = None,
) -> Fingerprint:
    """The fingerprint of running ``fn`` over ``df`` (plan columns are ignored)."""
    return fingerprint_of_ids(row_ids(df, key, cfg), fn, text, cfg, key)


def fingerprint_of_ids(
    ids: pl.Series, fn: Callable[..., Any], text: str | pl.Expr, cfg: BatchConfig,
    key: str | None,
) -> Fingerprint:
    hashes = ids.to_numpy() if key is None else np.sort(_hash(ids.to_frame()))
    rows = hashlib.blake2b(np.ascontiguousarray(hashes).tobytes(), digest_size=16).hexdigest()
    return Fingerprint(rows, ids.len(), key, fn_identity(fn), _config_identity(text, cfg))


def row_ids(df: pl.DataFrame, key: str | None, cfg: BatchConfig) -> pl.Series:
    """The key column, or a UInt64 content hash of each row's input columns."""
    if key is not None:
        return df[key]
    inputs = [c for c in df.columns if c not in cfg.columns.plan_names()]
    return pl.Series(_HASH, _hash(df.select(inputs)), dtype=pl.UInt64)


def _hash(df: pl.DataFrame) -> np.ndarray:
    try:
        hashes = df.hash_rows(seed=0x5EED).to_numpy()
    except pl.exceptions.PolarsError as exc:
        msg = f"cannot hash the input rows for the checkpoint ({exc}); pass key='<id column>'"
        raise CheckpointError(msg) from None
    return _float_bits(df, hashes)


_BITS = {pl.Float32: (np.uint32, 0x8000_0000), pl.Float64: (np.uint64, 0x8000_0000_0000_0000)}
_MIX = np.uint64(0x9E37_79B9_7F4A_7C15)


def _float_bits(df: pl.DataFrame, hashes: np.ndarray) -> np.ndarray:
    """``hash_rows`` hashes ``-0.0`` as ``0.0`` and every NaN alike, so a rerun whose input
    changed from one to the other would resume with the other value's answers. The rows
    holding such a value (``-0.0``, or a NaN other than ``float("nan")``) get their hash mixed
    with the value's bits; every other row keeps its hash (checkpoints of ordinary frames stay
    valid).

    >>> import polars as pl
    >>> df = pl.DataFrame({"x": [0.0, -0.0, 1.0]})
    >>> h = _hash(df)
    >>> bool(h[0] != h[1]), bool(h[2] == df.hash_rows(seed=0x5EED)[2])
    (True, True)
    """
    out = None
    for i, name in enumerate(df.columns):
        s = df[name]
        got = _BITS.get(s.dtype)  # type: ignore[call-overload]
        if got is None:
            continue
        uint, sign = got
        values = s.fill_null(0.0).to_numpy()
        bits = values.view(uint)
        plain_nan = np.array([np.nan], values.dtype).view(uint)[0]
        special = (bits == uint(sign)) | (np.isnan(values) & (bits != plain_nan))
        if not special.any():
            continue
        if out is None:
            out = hashes.copy()
        mixed = (out[special] ^ bits[special].astype(np.uint64)) * _MIX
        out[special] = mixed ^ np.uint64(i + 1)
    return hashes if out is None else out


def fn_identity(fn: Callable[..., Any]) -> dict[str, Any]:
    """Qualified name, ``partial`` arguments, code digest and ``fn.dfbatch_fingerprint``.

    The code digest (``dfbatch.persist._code``) covers fn's code and captured values; when it
    cannot be established, ``unsure`` says why instead (and a checkpoint refuses the run).

    >>> import functools
    >>> ident = fn_identity(functools.partial(round, ndigits=2))
    >>> ident["name"], ident["partial"], len(ident["code"])
    ('builtins.round', {'args': [], 'keywords': {'ndigits': 2}}, 32)
    """
    target: Any = fn
    out: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        target = fn.func
        out["partial"] = _plain({"args": list(fn.args), "keywords": fn.keywords})
    out = {"name": callable_name(target), **out}
    try:
        out["code"] = code_identity(fn)
    except Unsure as exc:  # the checkpoint refuses to resume with it (``unsure_error``)
        out["unsure"] = str(exc)
    details = getattr(fn, "dfbatch_fingerprint", None)
    if details is not None:
        if not isinstance(details, Mapping):
            msg = f"fn.dfbatch_fingerprint must be a dict, got {type(details).__name__}"
            raise ConfigError(msg)
        out["details"] = _plain(dict(details))
    return out


def _config_identity(text: str | pl.Expr, cfg: BatchConfig) -> dict[str, Any]:
    enc = cfg.encoding if isinstance(cfg.encoding, str) else callable_name(cfg.encoding)
    return {
        "text": text if isinstance(text, str) else str(text),
        "columns": dataclasses.asdict(cfg.columns),
        "oversize": cfg.oversize,
        "token_limit": cfg.token_limit,
        "encoding": enc,
        "request_overhead_tokens": cfg.request_overhead_tokens,
        "output_tokens_per_row": cfg.output_tokens_per_row,
        **({} if cfg.output_dtype is None else {"output_dtype": str(cfg.output_dtype)}),
    }


def _plain(value: Any) -> Any:
    """JSON-safe copy; objects without a JSON form become their type name (never an address)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda o: callable_name(o)))


def _fn_change(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, Mapping) or old.get("name") != new.get("name"):
        return f"fn: {_brief(old)} then, {_brief(new)} now"
    words = {"code": "its code or the values it captured", "partial": "its partial arguments",
             "details": "its declared dfbatch_fingerprint", "unsure": "its identity"}
    changed = []
    for k in sorted(set(old) | set(new)):
        if k != "name" and old.get(k) != new.get(k):
            shown = k in ("partial", "details")
            then_now = f" ({old.get(k)!r} then, {new.get(k)!r} now)" if shown else ""
            changed.append(f"{words.get(k, k)}{then_now}")
    return f"fn {new.get('name')}: {', '.join(changed)} changed"


def _brief(fn: Any) -> str:
    if not isinstance(fn, Mapping):
        return repr(fn)
    rest = {k: v for k, v in fn.items() if k not in ("name", "code", "unsure")}
    return f"{fn.get('name')}{' ' + repr(rest) if rest else ''}"


def unsure_error(root: Path, fp: Fingerprint) -> CheckpointError:
    """The error for an fn whose identity cannot be established (``fp.fn["unsure"]``)."""
    msg = (f"checkpoint {str(root)!r}: cannot tell whether fn {fp.fn.get('name')} is the fn "
           f"that wrote it: {fp.fn.get('unsure')}. Declare what identifies fn, e.g. "
           "fn.dfbatch_fingerprint = {'version': 1} (change it whenever fn changes what it "
           "returns), or pass resume='overwrite' to run afresh (such a checkpoint can only be "
           "resumed once fn declares its identity)")
    return CheckpointError(msg)


def mismatch_error(root: Path, fp: Fingerprint, old: Mapping[str, Any]) -> CheckpointError:
    """The error for a checkpoint at ``root`` whose manifest ``old`` is another run's."""
    diffs = fp.differences(old.get("fingerprint") or {})
    if old.get("polars") != pl.__version__ and fp.key is None:
        diffs.append(f"polars {old.get('polars')} then, {pl.__version__} now (row hashes "
                     "are stable only within a polars version; pass key= to avoid this)")
    what = "; ".join(diffs) or "the fingerprint differs"
    msg = (f"checkpoint {str(root)!r} belongs to another run: {what}. Use another directory, "
           "or pass resume='overwrite' to discard it")
    return CheckpointError(msg)
