"""``embed``: an ``fn`` for ``dfbatch.process`` that embeds each batch with one API request.

The embeddings API takes a list, so a batch is one request; the output is a ``List(Float32)``
column. Empty or null texts are not sent (the API rejects them): those rows get a ``RowError``.

Examples
--------
>>> import polars as pl, dfbatch, dfbatch.sim
>>> from dfbatch.llm import embed
>>> df = pl.DataFrame({"text": ["the cat sat", "the cat sat down", ""]})
>>> with dfbatch.sim.serve(time_scale=0.01) as url:
...     out = dfbatch.process(df, embed("sim-embed", dimensions=8, base_url=url), progress=False)
>>> out["output"].dtype, out["output"].list.len().to_list(), out["error"].to_list()
(List(Float32), [8, 8, None], [None, None, 'RowError: empty text: nothing to embed'])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import polars as pl

from dfbatch.errors import ConfigError, RowError
from dfbatch.execute._usage import report_usage
from dfbatch.llm.client import ClientSource, scrub
from dfbatch.llm.prompt import Template

_RATE_HEADERS = ("x-ratelimit-", "retry-after")


def embed(
    model: str,
    text: str = "text",
    *,
    dimensions: int | None = None,
    client: Any = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = None,
) -> Callable[[pl.DataFrame], Awaitable[list[Any] | pl.Series]]:
    """Build an async ``fn(batch)`` returning one embedding (``List(Float32)``) per row.

    Parameters
    ----------
    model
        Embedding model (``"text-embedding-3-small"``, or ``"sim-embed"`` on the simulator).
    text
        The column to embed, or a template over columns (``"{title}: {body}"``).
    dimensions
        Output size for models that support shortening (``None``: the model's default).
    client, base_url, api_key, timeout
        As for ``dfbatch.llm.chat``.
    """
    if not isinstance(model, str) or not model:
        msg = f"model must be a non-empty string, got {model!r}"
        raise ConfigError(msg)
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0
    ):
        msg = f"dimensions must be an integer > 0 or None, got {dimensions!r}"
        raise ConfigError(msg)
    template = Template(text if "{" in text else f"{{{text}}}", what="text")
    source = ClientSource(client, base_url=base_url, api_key=api_key, timeout=timeout)
    extra = {} if dimensions is None else {"dimensions": dimensions}

    async def fn(batch: pl.DataFrame) -> list[Any] | pl.Series:
        texts = template.render(batch)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        vectors: list[Any] = [RowError("empty text: nothing to embed")] * len(texts)
        if keep:
            try:
                client = await source.get()
                raw = await client.embeddings.with_raw_response.create(
                    model=model, input=[texts[i] for i in keep], **extra
                )
            except BaseException as exc:
                scrub(exc, source.secrets)
                raise
            response = raw.parse()
            usage = getattr(response, "usage", None)
            rate = {k: v for k, v in raw.headers.items() if k.lower().startswith(_RATE_HEADERS)}
            report_usage(input_tokens=getattr(usage, "prompt_tokens", 0) or 0, headers=rate or None)
            for item in sorted(response.data, key=lambda d: d.index):
                vectors[keep[item.index]] = _vector(item.embedding)
        if len(keep) == len(texts):
            return pl.Series("output", vectors, dtype=pl.List(pl.Float32))
        return vectors

    fn.__name__ = fn.__qualname__ = f"embed[{model}]"
    fn.dfbatch_fingerprint = {  # type: ignore[attr-defined]
        "kind": "embed",
        "model": model,
        "text": text,
        "dimensions": dimensions,
    }
    fn.dfbatch_output_tokens = 0  # type: ignore[attr-defined]
    return fn


def _vector(values: Any) -> pl.Series:
    if isinstance(values, str):  # base64 (when a client asks for it explicitly)
        import base64

        array = np.frombuffer(base64.b64decode(values), dtype="<f4")
    else:
        array = np.asarray(values, dtype=np.float32)
    return pl.Series(array.astype(np.float32, copy=False))
