"""A second opinion from a real gateway: dfbatch and the hand-written client behind a LiteLLM proxy.

Optional, outside ``make test`` (it needs a second venv and starts a server process).

Setup (once; PyPI must be reachable)::

    python -m venv benchmarks/.litellm-venv
    benchmarks/.litellm-venv/bin/pip install 'litellm[proxy]'

Run (with the project's venv, from the repository root)::

    .venv/bin/python benchmarks/litellm_check.py                 # proxy -> dfbatch.sim
    .venv/bin/python benchmarks/litellm_check.py --upstream mock  # proxy's mock_response

What it does: writes a proxy config (``model_list`` with one deployment and its ``rpm``, a
random local master key), starts ``litellm --config ... --port P`` from that venv, waits for
``/health/liveliness``, then runs, one after the other on fresh rows, ``dfbatch.process`` with
``dfbatch.llm.chat`` (per-row mode, ``base_url`` pointed at the proxy, told ``--rpm``) and the
hand-written client (``HandWrittenHTTP``: 1-s token buckets for RPM and TPM, exact cost =
prompt + ``max_tokens``, a global pause on 429 honoring ``retry-after`` / ``retry-after-ms``,
else 1 s doubling to 60 s). For each it reports the 429s the client saw (and, with the sim
upstream, the requests and 429s the provider saw, and the most requests it saw in any 10 s),
the rows failed and the makespan.

Upstreams:

``sim`` (default)
    The deployment forwards to ``dfbatch.sim`` started here as the provider, with
    ``--provider-rpm`` enforced per ``--window`` (``second``: a 1-s bucket; ``minute``: a
    calendar minute, as gateways count). This is what a user behind a company gateway meets.
``mock``
    The deployment answers with ``mock_response`` and carries ``rpm: --provider-rpm``. Found
    with LiteLLM 1.108.7 (2026-11): the proxy does *not* enforce a deployment's ``rpm``
    (nor without a database any per-key limit), so no 429 comes back; it shows only the
    proxy's own overhead and headers (``x-ratelimit-limit-requests`` /
    ``x-ratelimit-remaining-requests`` from the router).

Notes: LiteLLM retries an upstream 429 itself after the upstream's ``retry-after`` (a calendar
minute's rejection can then take up to a minute to answer) and forwards upstream headers as
``llm_provider-*``; pass ``--num-retries 0`` to make it hand 429s straight to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dfbatch
from dfbatch.llm import chat
from dfbatch.sim import serve
from dfbatch.sim.stats import max_in_sliding_window

VENV = Path(__file__).resolve().parent / ".litellm-venv"
MAX_TOKENS = 64


# -- the hand-written client over HTTP -------------------------------------------------------
class _Second:
    """A token bucket holding one second of a per-minute limit (None: unlimited)."""

    def __init__(self, per_minute: float | None) -> None:
        self.rate = (per_minute or math.inf) / 60.0
        self.level, self.t = self.rate, time.monotonic()

    def wait(self, units: float) -> float:
        if self.rate == math.inf:
            return 0.0
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.t) * self.rate)
        self.t = now
        return max(0.0, (min(units, self.rate) - self.level) / self.rate)


class HandWrittenHTTP:
    """The issue's ~80-line client, over the OpenAI SDK (see ``baselines.HandWritten``)."""

    def __init__(self, client: Any, model: str, rpm: float | None, tpm: float | None) -> None:
        self.client, self.model = client, model
        self.rpm, self.tpm = _Second(rpm), _Second(tpm)
        self.pause_until, self.pause_s = 0.0, 0.0
        self.n429 = 0
        self.lock = asyncio.Lock()

    async def _admit(self, cost: int) -> None:
        async with self.lock:  # one dispatcher: requests leave in order
            while True:
                wait = max(self.pause_until - time.monotonic(), self.rpm.wait(1),
                           self.tpm.wait(cost))
                if wait <= 0:
                    self.rpm.level -= 1
                    self.tpm.level -= cost
                    return
                await asyncio.sleep(wait)  # exactly until the buckets can pay

    async def one(self, text: str) -> str | None:
        import openai

        messages = [{"role": "user", "content": f"Summarize: {text}"}]
        cost = len(text) // 4 + 8 + MAX_TOKENS  # a user without tiktoken: ~4 chars a token
        for _ in range(50):
            await self._admit(cost)
            try:
                reply = await self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=MAX_TOKENS)
            except openai.RateLimitError as exc:
                self.n429 += 1
                self.pause_s = min(60.0, max(1.0, 2 * self.pause_s))
                hint = _hint(exc.response.headers)
                wait = hint if hint is not None else self.pause_s
                self.pause_until = max(self.pause_until, time.monotonic() + wait)
                continue
            except (openai.APIConnectionError, openai.InternalServerError):
                await asyncio.sleep(1.0)
                continue
            self.pause_s = 0.0
            return reply.choices[0].message.content
        return None


def _hint(headers: Any) -> float | None:
    if headers.get("retry-after-ms"):
        return float(headers["retry-after-ms"]) / 1000
    if headers.get("retry-after"):
        with contextlib.suppress(ValueError):
            return float(headers["retry-after"])
    return None


# -- what the clients saw --------------------------------------------------------------------
class Wire:
    """Every HTTP request this process sends (both runners): send time, status, seconds to
    the answer's headers, and which rate-limit headers the 429s carried.

    Counted at ``httpx``'s transport, under the OpenAI SDK, so it sees what the proxy sees from
    dfbatch and from the hand-written client alike (dfbatch's own count of 429s is not public).
    """

    def __init__(self) -> None:
        self.log: list[tuple[float, int, float]] = []
        self.hints_429: dict[str, int] = {}  # the rate-limit headers' names: how many 429s
        self.example_429: dict[str, str] = {}  # ... and the values of the first such 429

    def install(self) -> None:
        import openai

        # The SDK's own transport class (``httpx.AsyncHTTPTransport``, or its vendored copy).
        probe = openai.AsyncOpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
        transport = type(probe._client._transport)
        original = transport.handle_async_request
        wire = self

        async def counted(transport: Any, request: Any) -> Any:
            t = time.monotonic()
            response = await original(transport, request)
            if request.url.path.endswith("/chat/completions"):
                wire.log.append((t, response.status_code, time.monotonic() - t))
                if response.status_code == 429:
                    rate = {k: v for k, v in response.headers.items()
                            if "retry" in k or "ratelimit" in k}
                    hint = ",".join(sorted(rate)) or "none"
                    wire.hints_429[hint] = wire.hints_429.get(hint, 0) + 1
                    wire.example_429.setdefault(hint, ", ".join(f"{k}: {v}"
                                                                for k, v in sorted(rate.items())))
            return response

        transport.handle_async_request = counted  # type: ignore[method-assign,assignment]

    def since(self, t0: float) -> dict[str, Any]:
        mine = [(t, s, dt) for t, s, dt in self.log if t >= t0]
        sent = [t for t, _, _ in mine]
        return {"client requests": len(sent),
                "client 429s": sum(1 for _, s, _ in mine if s == 429),
                "max/10s sent": max_in_sliding_window(sent, 10.0) if sent else 0,
                "slowest answer_s": max((dt for _, _, dt in mine), default=0.0)}


WIRE = Wire()


# -- the proxy -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(upstream: str | None, rpm: float, key: str, num_retries: int | None) -> str:
    params = ["      model: openai/sim-chat", "      api_key: sk-upstream-unused"]
    if upstream is None:
        params.append('      mock_response: "A mock answer."')
    else:
        params.append(f"      api_base: {upstream}")
    params.append(f"      rpm: {rpm:g}")
    router = ["router_settings:", "  routing_strategy: usage-based-routing-v2",
              "  enable_pre_call_checks: true"]
    if num_retries is not None:
        router.append(f"  num_retries: {num_retries}")
    return "\n".join(["model_list:", "  - model_name: chat", "    litellm_params:", *params,
                      *router, "general_settings:", f"  master_key: {key}", ""])


@contextlib.contextmanager
def litellm_proxy(config: str) -> Iterator[str]:
    exe = VENV / "bin" / "litellm"
    if not exe.exists():
        msg = f"no LiteLLM at {exe}: see this script's docstring for the one-time setup"
        raise SystemExit(msg)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(config)
        log = (Path(tmp) / "proxy.log").open("w")
        proc = subprocess.Popen([str(exe), "--config", str(cfg), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            _wait_up(f"http://127.0.0.1:{port}/health/liveliness", proc)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop(proc)
            log.close()


def stop(proc: subprocess.Popen[Any]) -> None:
    """Terminate a server process, killing it if it has not exited within 10 s."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()


def _wait_up(url: str, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"the LiteLLM proxy exited with {proc.returncode} before it was up"
            raise SystemExit(msg)
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2):
                return
        time.sleep(0.5)
    msg = f"the LiteLLM proxy was not up within {timeout:.0f} s"
    raise SystemExit(msg)


# -- the runs --------------------------------------------------------------------------------
def texts(n: int, offset: int) -> list[str]:
    return [f"Row {offset + i}. The quick brown fox jumps over the lazy dog." for i in range(n)]


def run_dfbatch(url: str, key: str, rows: list[str], rpm: float) -> dict[str, Any]:
    fn = chat("chat", base_url=url, api_key=key, max_tokens=MAX_TOKENS)
    t0 = time.monotonic()
    out = dfbatch.process(pl.DataFrame({"text": rows}), fn, text="text", rpm=rpm,
                          progress=False)
    retried = int((out["attempts"] - 1).clip(0).sum()) if "attempts" in out.columns else -1
    return {"makespan_s": time.monotonic() - t0, "failed": int(out["error"].is_not_null().sum()),
            "row re-attempts": retried, **WIRE.since(t0)}


def run_handwritten(url: str, key: str, rows: list[str], rpm: float) -> dict[str, Any]:
    import openai

    async def go() -> tuple[list[str | None], int]:
        async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0) as client:
            hw = HandWrittenHTTP(client, "chat", rpm, None)
            results = await asyncio.gather(*(hw.one(t) for t in rows))
            return list(results), hw.n429

    t0 = time.monotonic()
    results, n429 = asyncio.run(go())
    if n429 != WIRE.since(t0)["client 429s"]:
        print(f"  (the hand-written client counted {n429} 429s, the wire another number)")
    return {"makespan_s": time.monotonic() - t0, "failed": sum(r is None for r in results),
            "row re-attempts": n429, **WIRE.since(t0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", choices=("sim", "mock"), default="sim")
    p.add_argument("--window", choices=("second", "minute"), default="second")
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--rpm", type=float, default=120.0, help="the rpm every client is told")
    p.add_argument("--provider-rpm", type=float, default=120.0)
    p.add_argument("--num-retries", type=int, default=None, help="the proxy's retries")
    p.add_argument("--dump", type=Path, default=None,
                   help="a folder to write the clients' and the provider's request logs to (CSV)")
    p.add_argument("--shared", action="store_true",
                   help="one provider and one proxy for both runners (before 2026-12: the "
                        "second runner then meets the first one's minute at the proxy's router)")
    a = p.parse_args(argv)
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    WIRE.install()
    runners = (("dfbatch", run_dfbatch), ("handwritten", run_handwritten))
    print(f"upstream {a.upstream}"
          + (f" ({a.provider_rpm:g} RPM per {a.window})" if a.upstream == "sim" else "")
          + f"; {a.rows} rows per client, told rpm={a.rpm:g}; proxy retries "
          + ("default" if a.num_retries is None else str(a.num_retries))
          + ("; one proxy for both" if a.shared else "; a fresh provider and proxy each"))
    if a.shared:
        with _setup(a) as (sim, url, key):
            for i, (name, runner) in enumerate(runners):
                _one(a, i, name, runner, sim, url, key)
    else:
        for i, (name, runner) in enumerate(runners):
            with _setup(a) as (sim, url, key):
                _one(a, i, name, runner, sim, url, key)
    if a.dump is not None:
        a.dump.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(WIRE.log, schema=["t", "status", "latency_s"], orient="row").write_csv(
            a.dump / "client.csv")
    if WIRE.hints_429:
        print("  rate-limit headers of the 429s the clients saw:")
        for hint, n in WIRE.hints_429.items():
            print(f"    {n} x, e.g. [{WIRE.example_429[hint]}]")


@contextlib.contextmanager
def _setup(a: argparse.Namespace) -> Iterator[tuple[Any, str, str]]:
    """The provider (``dfbatch.sim``, or none for ``mock``) and the proxy in front of it."""
    key = "sk-local-" + secrets.token_hex(16)  # a throwaway key for this local proxy only
    sim, upstream = None, None
    if a.upstream == "sim":
        window: dict[str, dict[str, Any]] = {"second": {"limit_window_s": 1.0},
                                             "minute": {"limit_mode": "calendar"}}
        sim = serve(rpm=a.provider_rpm, tpm=None, time_scale=1.0, ttft_s=0.2, per_token_s=0.0,
                    tail_prob=0.0, **window[a.window])
        upstream = sim.open()
    try:
        config = proxy_config(upstream, a.provider_rpm, key, a.num_retries)
        with litellm_proxy(config) as url:
            yield sim, url, key
    finally:
        if sim is not None:
            if a.dump is not None:
                a.dump.mkdir(parents=True, exist_ok=True)
                n = len(list(a.dump.glob("provider*.csv")))
                sim.stats.frame().write_csv(a.dump / f"provider{n}.csv")
            sim.close()


def _one(a: argparse.Namespace, i: int, name: str, runner: Any, sim: Any, url: str,
         key: str) -> None:
    """Run one client and print what it and the provider saw."""
    before = sim.stats.snapshot() if sim else None
    t_start = sim.stats.now() if sim else 0.0
    res = runner(url, key, texts(a.rows, i * a.rows), a.rpm)
    if sim is not None and before is not None:
        after = sim.stats.snapshot()
        res["provider requests"] = after.requests - before.requests
        res["provider 429s"] = after.rate_limited - before.rate_limited
        frame = sim.stats.frame().filter(pl.col("t") >= t_start)
        res["max/10s at provider"] = max_in_sliding_window(frame["t"].to_list(), 10.0)
        ok = frame.filter(pl.col("status") == 200)["t"].to_list()
        res["max 200s/10s at provider"] = max_in_sliding_window(ok, 10.0)
    print(f"  {name:<12} " + ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in res.items()), flush=True)

if __name__ == "__main__":
    main()
