"""Adapters from an OpenAI-compatible API to dfbatch's ``fn``: ``chat`` and ``embed``.

They use the official ``openai`` SDK (``pip install 'dfbatch[llm]'``, imported when an adapter
is built, never by ``import dfbatch``) and work with OpenAI, any OpenAI-compatible server (vLLM,
Ollama, llama.cpp) and dfbatch's local simulator (``dfbatch.sim``). Each returned ``fn`` reports
real token usage to the run, lets API errors reach dfbatch's retry logic unchanged (with the
server's ``retry-after``), carries ``dfbatch_fingerprint`` (for checkpoints; never a key or an
endpoint) and ``dfbatch_output_tokens`` (charged against ``tpm``), and never shows the API key
in results, errors or reprs. With ``api="batch"`` they run as the provider's Batch API jobs
instead (half price; ``dfbatch.llm.batch_api``, limits in ``BatchLimits``).

Examples
--------
>>> import polars as pl, dfbatch, dfbatch.sim
>>> from dfbatch.llm import chat
>>> schema = {"type": "object", "properties": {"title": {"type": "string"},
...                                            "n_words": {"type": "integer"}}}
>>> df = pl.DataFrame({"text": ["Small batches keep latency low."]})
>>> with dfbatch.sim.serve(time_scale=0.01) as url:
...     fn = chat("sim-chat", "Describe: {text}", response_format=schema, base_url=url)
...     out = dfbatch.process(df, fn, progress=False)
>>> out["output"].to_list()
[{'title': 'Small batches keep latency low.', 'n_words': 5}]
"""

from __future__ import annotations

from dfbatch.llm.batch_api import BatchLimits
from dfbatch.llm.chat import chat
from dfbatch.llm.embed import embed

__all__ = ["BatchLimits", "chat", "embed"]
