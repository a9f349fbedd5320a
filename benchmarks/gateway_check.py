"""A second opinion from a limiter we did not write: dfbatch behind express-rate-limit.

Optional, outside ``make test`` (it needs Node and npm packages, and starts a server process).

Setup (once; the npm registry must be reachable)::

    npm ci --prefix benchmarks/gateway

Run (with the project's venv, from the repository root)::

    .venv/bin/python benchmarks/gateway_check.py               # 5 requests a second, 150 rows
    .venv/bin/python benchmarks/gateway_check.py --limit 10 --rows 300

What it does: for each header revision of the IETF draft that express-rate-limit 8 speaks
(``draft-6``: ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` + ``RateLimit-Policy: 5;w=1``;
``draft-7``: ``RateLimit: limit=5, remaining=4, reset=1``; ``draft-8``: ``RateLimit-Policy:
"5-in-1sec"; q=5; w=1`` + ``RateLimit: "5-in-1sec"; r=4; t=1``) and with no headers at all
(``none``; a 429 then carries nothing either), it starts ``benchmarks/gateway/server.mjs`` (an
OpenAI-compatible mock answering after 0.2 s, behind a fixed window of ``--limit`` requests
per second), then runs ``dfbatch.process`` with ``dfbatch.llm.chat`` (per-row mode, **not
told** any limit: only the gateway's answers guide it) on fresh rows. The hand-written client
(1-s buckets, told the true rate, a global pause on 429) runs once against the draft-8 server
as the bar. Each run reports the requests and 429s on the wire (counted under the OpenAI SDK),
failed rows, the makespan and its ratio to the bound (``rows / limit`` seconds: the window
admits ``limit`` a second, whoever sends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfbatch
from benchmarks.litellm_check import MAX_TOKENS, WIRE, HandWrittenHTTP, stop, texts
from dfbatch.llm import chat

GATEWAY = Path(__file__).resolve().parent / "gateway"
KEY = "sk-gateway-unused"  # the mock checks no key


@contextlib.contextmanager
def gateway(limit: int, std: str, latency_ms: int) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (GATEWAY / "node_modules" / "express-rate-limit").exists():
        msg = ("needs node and the gateway's packages: npm ci --prefix benchmarks/gateway "
               "(see this script's docstring)")
        raise SystemExit(msg)
    env = {**os.environ, "PORT": "0", "LIMIT": str(limit), "WINDOW_MS": "1000", "STD": std,
           "LATENCY_MS": str(latency_ms)}
    proc = subprocess.Popen([node, str(GATEWAY / "server.mjs")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening <port>"
        if not line.startswith("listening "):
            msg = f"the gateway did not start: {line.strip()!r}"
            raise SystemExit(msg)
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        stop(proc)


def run_dfbatch(url: str, rows: list[str], limit: int) -> dict[str, Any]:
    fn = chat("mock", base_url=url, api_key=KEY, max_tokens=MAX_TOKENS)
    t0 = time.monotonic()
    out = dfbatch.process(pl.DataFrame({"text": rows}), fn, text="text", progress=False)
    return {"makespan_s": time.monotonic() - t0,
            "failed": int(out["error"].is_not_null().sum()), **WIRE.since(t0)}


def run_handwritten(url: str, rows: list[str], limit: int) -> dict[str, Any]:
    import openai

    async def go() -> list[str | None]:
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
            hw = HandWrittenHTTP(client, "mock", limit * 60.0, None)  # told the true rate
            return list(await asyncio.gather(*(hw.one(t) for t in rows)))

    t0 = time.monotonic()
    results = asyncio.run(go())
    return {"makespan_s": time.monotonic() - t0, "failed": sum(r is None for r in results),
            **WIRE.since(t0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=5, help="requests a second the gateway admits")
    p.add_argument("--rows", type=int, default=150)
    p.add_argument("--latency-ms", type=int, default=200)
    p.add_argument("--headers", default="draft-6,draft-7,draft-8,none")
    a = p.parse_args(argv)
    WIRE.install()
    bound = a.rows / a.limit
    print(f"express-rate-limit: {a.limit} requests per 1-s fixed window; {a.rows} rows per run; "
          f"bound {bound:.1f} s")
    print(f"{'client':<24} {'makespan':>9} {'x bound':>8} {'requests':>9} {'429s':>6} "
          f"{'429/req':>8} {'failed':>7}")
    runs: list[tuple[str, str, Any]] = [(f"dfbatch, {h}", h, run_dfbatch)
                                        for h in a.headers.split(",")]
    runs.append(("handwritten (told)", "draft-8", run_handwritten))
    for i, (name, std, runner) in enumerate(runs):
        with gateway(a.limit, std, a.latency_ms) as url:
            res = runner(url, texts(a.rows, i * a.rows), a.limit)
        sent, n429 = res["client requests"], res["client 429s"]
        print(f"{name:<24} {res['makespan_s']:>8.1f}s {res['makespan_s'] / bound:>8.3f} "
              f"{sent:>9} {n429:>6} {n429 / max(1, sent):>8.1%} {res['failed']:>7}",
              flush=True)


if __name__ == "__main__":
    main()
