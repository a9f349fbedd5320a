"""``embed``: an ``fn`` for ``dfbatch.process`` that embeds each batch with one API request.

The embeddings API takes a list, so a batch is one request; the output is a ``List(Float32)``
column. Empty or null texts are not sent: the run gives them the error ``null_text`` (and under
``send_null=True`` the adapter still skips them, with a ``RowError``: the API rejects them).

Examples
--------
>>> import polars as pl, dfbatch, dfbatch.sim
>>> from dfbatch.llm import embed
>>> df = pl.DataFrame({"text": ["the cat sat", "the cat sat down", ""]})
>>> with dfbatch.sim.serve(time_scale=0.01) as url:
...     out = dfbatch.process(df, embed("sim-embed", dimensions=8, base_url=url), progress=False)
>>> out["output"].dtype, out["output"].list.len().to_list(), out["error"].str.slice(0, 9).to_list()
(List(Float32), [8, 8, None], [None, None, 'null_text'])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import numpy as np
import polars as pl

from dfbatch.errors import ConfigError, OutputError, RowError
from dfbatch.execute._charge import bound, count_tokens, per_request, request
from dfbatch.execute._headers import rate_headers
from dfbatch.execute._usage import report_usage
from dfbatch.llm.batch_api import Answer, BatchAdapter, BatchLimits
from dfbatch.llm.client import ClientSource, scrub
from dfbatch.llm.prompt import Template


def embed(
    model: str,
    text: str = "text",
    *,
    dimensions: int | None = None,
    client: Any = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = None,
    api: Literal["sync", "batch"] = "sync",
    batch_limits: BatchLimits | None = None,
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
    api, batch_limits
        ``api="batch"``: ``dfbatch.process`` sends one Batch API line per row (half price,
        answered within the completion window); see ``dfbatch.llm.chat``.
    """
    if api not in ("sync", "batch"):
        msg = f"api must be 'sync' or 'batch', got {api!r}"
        raise ConfigError(msg)
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
            inputs = [texts[i] for i in keep]
            tokens = sum(count_tokens(inputs, model)) if bound() is not None else 0
            try:
                client = await source.get()
                async with request(tokens=tokens) as req:
                    raw = await client.embeddings.with_raw_response.create(
                        model=model, input=inputs, **extra
                    )
                    response = raw.parse()
                    usage = getattr(response, "usage", None)
                    used = getattr(usage, "prompt_tokens", 0) or 0
                    req.report(headers=raw.headers, tokens=used)
            except BaseException as exc:
                scrub(exc, source.secrets)
                raise
            _check_indices(response.data, len(inputs))
            report_usage(input_tokens=used, headers=rate_headers(raw.headers) or None)
            for item in response.data:
                vectors[keep[item.index]] = _vector(item.embedding)
        if len(keep) == len(texts):
            return pl.Series("output", vectors, dtype=pl.List(pl.Float32))
        return vectors

    per_request(fn, sends="one")
    fn.__name__ = fn.__qualname__ = f"embed[{model}]"
    fn.dfbatch_fingerprint = {  # type: ignore[attr-defined]
        "kind": "embed",
        "model": model,
        "text": text,
        "dimensions": dimensions,
    }
    fn.dfbatch_output_tokens = 0  # type: ignore[attr-defined]
    if api == "batch":
        fn.dfbatch_fingerprint["api"] = "batch"  # type: ignore[attr-defined]
        fn.dfbatch_batch_api = BatchAdapter(  # type: ignore[attr-defined]
            "/v1/embeddings", model, source,
            lambda frame: [{"model": model, "input": t, **extra} for t in template.render(frame)],
            _batch_answer, pl.List(pl.Float32), batch_limits or BatchLimits())
    fn.dfbatch_inputs = (text,)  # type: ignore[attr-defined]  # the cache's key
    return fn


def _batch_answer(body: dict[str, Any]) -> Answer:
    """One Batch API answer (one input per line) as the row's vector."""
    data = body["data"]
    if len(data) != 1:
        msg = f"expected one vector for one input, got {len(data)}"
        raise ValueError(msg)  # the row gets this as its error (batch_api.read_results)
    used = (body.get("usage") or {}).get("prompt_tokens", 0) or 0
    return Answer(_vector(data[0]["embedding"]).to_list(), used)


def _check_indices(data: Any, n: int) -> None:
    """One vector per input, each index once: anything else is the server's error, for the
    whole batch (an ``OutputError``: not retried, not bisected)."""
    indices = sorted(getattr(item, "index", -1) for item in data)
    if indices != list(range(n)):
        got = f"{len(indices)} vectors" if len(indices) != n else f"vectors at indices {indices}"
        msg = f"the embeddings API answered {got} for {n} inputs; expected one per input"
        raise OutputError(msg)


def _vector(values: Any) -> pl.Series:
    if isinstance(values, str):  # base64 (when a client asks for it explicitly)
        import base64

        array = np.frombuffer(base64.b64decode(values), dtype="<f4")
    else:
        array = np.asarray(values, dtype=np.float32)
    return pl.Series(array.astype(np.float32, copy=False))
