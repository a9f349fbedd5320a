"""A local **simulator** of an OpenAI-compatible API, for demos, tests and benchmarks.

Not a language model: answers are deterministic stand-ins (an extractive summary, a keyword
list, JSON filling a schema, hashed pseudo-embeddings) served over real HTTP with realistic
behaviour: latency with a heavy tail, RPM/TPM limits answered with 429 and ``retry-after`` /
``x-ratelimit-*`` headers, and injected faults (500s, hangs, connection resets, poison inputs
answered with 400). Usage counts are real tiktoken counts. See ``SimConfig`` for every knob.

Provider models, to judge a client against what providers document rather than what it
assumes: per-second enforcement of per-minute limits (``limit_window_s=1``), a gateway's
calendar minute (``limit_mode="calendar"``), header styles (``headers="openai" | "none" |
"litellm" | "ietf"``), an outage (``outage=(start_s, duration_s)``, connections reset or
503), auth / permission / unknown-model errors (401 / 403 / 404) and overload 429s.
``server.stats`` logs every request (arrival, status, kind, down or not);
``max_in_sliding_window`` and ``SimStats.max_in_window`` count the most requests in any
window of T seconds.

Start it from the command line (``dfbatch sim --port 8000``), in a script or notebook
(``with dfbatch.sim.serve() as url:``, the server runs in a background thread), or inside a
running event loop (``async with dfbatch.sim.serve() as url:``). Needs ``pip install
'dfbatch[llm]'`` (aiohttp).

Examples
--------
>>> import dfbatch.sim
>>> server = dfbatch.sim.serve(rpm=1000, tpm=100_000, time_scale=0.01)
>>> with server as url:
...     url.startswith("http://127.0.0.1:") and url.endswith("/v1")
True
"""

from __future__ import annotations

from dfbatch.sim.config import SimConfig
from dfbatch.sim.server import SimServer, serve
from dfbatch.sim.stats import SimSnapshot, SimStats, max_in_sliding_window

__all__ = ["SimConfig", "SimServer", "SimSnapshot", "SimStats", "max_in_sliding_window", "serve"]
