"""Charge the run's rate limits from inside your own client: once per HTTP request you send.

``dfbatch.process(df, fn, rpm=..., tpm=...)`` charges one request and the batch's estimated
tokens per *call of fn* — right when fn sends one request per batch. When fn sends several
requests (one per row, or a retry of its own), tell dfbatch what it really sends:

- wrap each HTTP request in ``async with dfbatch.limits.request(tokens=n) as req:`` where ``n``
  is what the provider will charge against its token limit (prompt, system message, and
  ``max_tokens``: providers count the output cap up front). It waits as the run's limits say
  (request rate, token rate, a global pause after a 429, a circuit breaker during an outage);
  an exception inside is reported (a 429 slows the run, an outage opens the breaker) and
  re-raised unchanged; ``req.report(headers=..., tokens=...)`` passes on the answer's
  rate-limit headers (``x-ratelimit-*``, ``retry-after`` in any spelling) and its real usage;
- mark fn with ``@dfbatch.limits.per_request`` so the run does not charge its calls as well
  (its concurrency limits still apply).

Outside a run ``request()`` charges nothing and never waits, so the same client works alone.
``dfbatch.llm.chat`` and ``dfbatch.llm.embed`` do this for you.

Examples
--------
>>> import asyncio, polars as pl, dfbatch, dfbatch.limits
>>> async def ask(text: str) -> str:
...     async with dfbatch.limits.request(tokens=len(text.split()) + 16) as req:
...         answer = text.upper()                       # your HTTP request goes here
...         req.report(headers={"x-ratelimit-remaining-requests": "599"}, tokens=5)
...     return answer
>>> asyncio.run(ask("outside a run"))                   # no run: no limits, no waiting
'OUTSIDE A RUN'
>>> @dfbatch.limits.per_request
... async def fn(batch: pl.DataFrame) -> list[str]:     # one request per row
...     return list(await asyncio.gather(*(ask(t) for t in batch["text"])))
>>> df = pl.DataFrame({"text": ["a b", "c d", "e f"]})
>>> dfbatch.process(df, fn, rpm=600, progress=False)["output"].to_list()
['A B', 'C D', 'E F']
"""

from __future__ import annotations

from dfbatch.execute._charge import Request, per_request, request

__all__ = ["Request", "per_request", "request"]
