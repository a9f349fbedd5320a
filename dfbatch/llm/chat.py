"""``chat``: an ``fn`` for ``dfbatch.process`` that sends each batch to a chat-completions API.

Two modes. ``"per_row"``: one request per row, the batch's requests run concurrently; a row
rejected by the API with 400 / 413 / 422 (bad or poisoned input) fails alone as a ``RowError``,
while retryable errors (429, 5xx, timeouts, lost connections) propagate unchanged to the pool,
which backs off (honoring ``retry-after``) and retries. Rows of that batch that had already
succeeded are kept and not sent again on the retry. ``"batch"``: one request for the whole
batch (rows as a numbered JSON list, see ``dfbatch.llm.batchmode``), cheaper in requests.

Examples
--------
>>> import polars as pl, dfbatch, dfbatch.sim
>>> from dfbatch.llm import chat
>>> df = pl.DataFrame({"text": ["Polars is fast. It is written in Rust.", "Arrow is columnar."]})
>>> with dfbatch.sim.serve(time_scale=0.01) as url:
...     fn = chat("sim-chat", "Summarize: {text}", max_tokens=32, base_url=url)
...     out = dfbatch.process(df, fn, progress=False)
>>> out["output"].to_list()
['Polars is fast.', 'Arrow is columnar.']
>>> fn.dfbatch_output_tokens, fn.dfbatch_fingerprint["prompt"]
(32, 'Summarize: {text}')
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from dfbatch.errors import ConfigError, RowError
from dfbatch.execute._charge import bound, count_tokens, per_request, request
from dfbatch.execute._headers import rate_headers
from dfbatch.execute._outputs import Partial, attach_partial
from dfbatch.execute._usage import report_usage
from dfbatch.llm import _reply as reply
from dfbatch.llm import batchmode, prices
from dfbatch.llm.batch_api import Answer, BatchAdapter, BatchLimits
from dfbatch.llm.client import ClientSource, import_openai, scrub
from dfbatch.llm.prompt import Template
from dfbatch.llm.schema import ResponseFormat

Mode = Literal["per_row", "batch"]
Api = Literal["sync", "batch"]
_ROW_STATUSES = frozenset({400, 413, 422})  # the input itself is bad: fail that row only
_STASH_MAX = 4096


@dataclass
class _Spec:
    model: str
    template: Template
    system: str | None
    max_tokens: int
    temperature: float | None
    fmt: ResponseFormat
    source: ClientSource
    extra: dict[str, Any]
    stash: dict[str, Any] = field(default_factory=dict)  # row answers kept across retries

    def params(self, max_tokens: int) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, **self.extra}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out


def chat(
    model: str,
    prompt: str = "Summarize: {text}",
    *,
    system: str | None = None,
    max_tokens: int = 256,
    temperature: float | None = None,
    response_format: Any = None,
    mode: Mode = "per_row",
    client: Any = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = None,
    extra_body: dict[str, Any] | None = None,
    api: Api = "sync",
    batch_limits: BatchLimits | None = None,
) -> Callable[[pl.DataFrame], Awaitable[list[Any] | pl.Series]]:
    """Build an async ``fn(batch)`` that answers ``prompt`` for every row with a chat model.

    Parameters
    ----------
    model
        Model name (``"gpt-4o-mini"``, or ``"sim-chat"`` on the local simulator).
    prompt
        Template of the user message; ``{col}`` placeholders name columns of the frame.
    system
        Optional system message (sent with every request).
    max_tokens
        Output cap per row. dfbatch charges it against ``tpm`` (as providers do).
    temperature
        Sampling temperature; ``None`` sends none (the server's default).
    response_format
        ``None`` (text column), a pydantic model class or a JSON schema dict (struct column).
    mode
        ``"per_row"`` (one request per row, concurrently) or ``"batch"`` (one request per batch).
    client, base_url, api_key, timeout
        An ``openai.AsyncOpenAI`` client, or how to make one (defaults: ``OPENAI_BASE_URL``,
        ``OPENAI_API_KEY``; ``timeout`` in seconds per request). Retries are dfbatch's: the
        client is used with ``max_retries=0``.
    extra_body
        Extra request fields (e.g. ``{"seed": 1}``), recorded in the fingerprint.
    api
        ``"sync"`` (calls as the pool runs) or ``"batch"``: ``dfbatch.process`` sends the rows
        as the provider's Batch API jobs (half price, answered within the completion window;
        see ``dfbatch.run._batch_api``). Needs ``mode="per_row"``. Calling ``fn`` directly
        still makes synchronous calls.
    batch_limits
        ``dfbatch.llm.batch_api.BatchLimits`` for ``api="batch"`` (file limits, polling,
        discount); the default is OpenAI's.
    """
    if mode not in ("per_row", "batch"):
        msg = f"mode must be 'per_row' or 'batch', got {mode!r}"
        raise ConfigError(msg)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        msg = f"max_tokens must be an integer > 0, got {max_tokens!r}"
        raise ConfigError(msg)
    if temperature is not None and not (
        isinstance(temperature, (int, float)) and 0 <= temperature <= 2
    ):
        msg = f"temperature must be a number in [0, 2] or None, got {temperature!r}"
        raise ConfigError(msg)
    if not isinstance(model, str) or not model:
        msg = f"model must be a non-empty string, got {model!r}"
        raise ConfigError(msg)
    if api not in ("sync", "batch"):
        msg = f"api must be 'sync' or 'batch', got {api!r}"
        raise ConfigError(msg)
    if api == "batch" and mode != "per_row":
        msg = "api='batch' sends one request per row: use mode='per_row' (the default)"
        raise ConfigError(msg)
    spec = _Spec(
        model,
        Template(prompt),
        system,
        max_tokens,
        temperature,
        ResponseFormat.of(response_format),
        ClientSource(client, base_url=base_url, api_key=api_key, timeout=timeout),
        dict(extra_body or {}),
    )
    fn = _per_row_fn(spec) if mode == "per_row" else _batch_fn(spec)
    per_row_out = max_tokens + (batchmode.ITEM_OVERHEAD_TOKENS if mode == "batch" else 0)
    fn.__name__ = fn.__qualname__ = f"chat[{model}]"
    fn.dfbatch_fingerprint = {  # type: ignore[attr-defined]
        "kind": "chat",
        "mode": mode,
        "model": model,
        "prompt": prompt,
        "system": system,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "response_format": spec.fmt.api,
        "extra_body": spec.extra,
    }
    fn.dfbatch_output_tokens = per_row_out  # type: ignore[attr-defined]
    if api == "batch":
        fn.dfbatch_fingerprint["api"] = "batch"  # type: ignore[attr-defined]
        fn.dfbatch_batch_api = _batch_adapter(spec, batch_limits)  # type: ignore[attr-defined]
    fn.dfbatch_inputs = spec.template.fields  # type: ignore[attr-defined]  # the cache's key
    fn.dfbatch_tokens = functools.partial(_tokens_of, spec, mode)  # type: ignore[attr-defined]
    fn.dfbatch_price = prices.of(model)  # type: ignore[attr-defined]
    return fn


def _batch_adapter(spec: _Spec, limits: BatchLimits | None) -> BatchAdapter:
    """How a row becomes one line of a Batch API file, and its answer a value."""
    completion_type = import_openai().types.chat.ChatCompletion

    def bodies(frame: pl.DataFrame) -> list[dict[str, Any]]:
        base = spec.params(spec.max_tokens)
        if spec.fmt.api is not None:
            base["response_format"] = spec.fmt.api
        return [{"messages": _messages(spec.system, p), **base}
                for p in spec.template.render(frame)]

    def answer(body: dict[str, Any]) -> Answer:
        completion = completion_type.model_validate(body)
        used = reply.used(completion)
        choices = completion.choices
        if not choices or choices[0].message is None:  # paid for, nothing to keep
            return Answer(RowError("the batch answer has no choices (no message to read); "
                                   "rerun with retry_errors=True to send the row again"), *used)
        return Answer(reply.answer(spec.fmt, completion), *used)

    dtype = spec.fmt.dtype if spec.fmt.structured else pl.String()
    return BatchAdapter("/v1/chat/completions", spec.model, spec.source, bodies, answer, dtype,
                        limits or BatchLimits())


def _tokens_of(spec: _Spec, mode: Mode, batch: pl.DataFrame) -> tuple[int, int]:
    """(input, output) tokens the requests for one batch send: the rendered template, the
    system message and the chat framing counted as the run charges them; output at its cap
    (``max_tokens`` per row). ``summary(fn=...)`` prices a plan with it."""
    prompts = spec.template.render(batch)
    if mode == "batch":
        system = batchmode.system_message(spec.system, spec.fmt.schema)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": batchmode.user_message(prompts)}]
        return _prompt_tokens(spec, messages), len(prompts) * (
            spec.max_tokens + batchmode.ITEM_OVERHEAD_TOKENS) + 16
    tokens_in = sum(_prompt_tokens(spec, _messages(spec.system, p)) for p in prompts)
    return tokens_in, len(prompts) * spec.max_tokens


def _per_row_fn(spec: _Spec) -> Callable[[pl.DataFrame], Awaitable[list[Any] | pl.Series]]:
    async def fn(batch: pl.DataFrame) -> list[Any] | pl.Series:
        prompts = spec.template.render(batch)
        try:
            client = await spec.source.get()
            outcomes = await _rows(spec, client, prompts)
        except BaseException as exc:
            scrub(exc, spec.source.secrets)
            raise
        failure = _worst(outcomes)
        if failure is not None:
            for p, outcome in zip(prompts, outcomes, strict=True):
                if isinstance(outcome, _Row):
                    _stash(spec, p, outcome)  # kept, and reported when the batch succeeds
            if isinstance(failure, Exception):  # if the run gives up, the answers stay
                done = [o for o in outcomes if isinstance(o, _Row)]
                attach_partial(failure, Partial(
                    [o.value if isinstance(o, _Row) else None for o in outcomes],
                    [isinstance(o, _Row) for o in outcomes],
                    sum(r.input_tokens for r in done), sum(r.output_tokens for r in done)))
            raise scrub(failure, spec.source.secrets)
        rows = [o for o in outcomes if isinstance(o, _Row)]
        report_usage(
            input_tokens=sum(r.input_tokens for r in rows),
            output_tokens=sum(r.output_tokens for r in rows),
            headers=next((r.headers for r in reversed(rows) if r.headers), None),
        )
        return reply.column(spec.fmt, [r.value for r in rows])

    return per_request(fn)


@dataclass(frozen=True, slots=True)
class _Row:
    """One row's answer (a value or a ``RowError``) and what its request used."""

    value: Any
    input_tokens: int = 0
    output_tokens: int = 0
    headers: dict[str, str] | None = None


class _NotSent(Exception):
    """A row whose request was not sent: another row of its batch failed first."""


async def _rows(spec: _Spec, client: Any, prompts: list[str]) -> list[Any]:
    """Every row's outcome (a ``_Row`` or an exception). Once a row fails (a 5xx, a 429, a
    lost connection: the batch will be retried), rows still waiting for the run's limits are
    not sent (``_NotSent``); rows in flight finish (their answers are kept). Cancelled (a
    drain's end, Ctrl-C), the rows answered so far are stashed: paid for, a rerun (a resume)
    takes them without sending them again."""
    sent = [False] * len(prompts)
    tasks = [asyncio.ensure_future(_one_row(spec, client, p, sent, i))
             for i, p in enumerate(prompts)]
    try:
        pending: set[asyncio.Future[_Row]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                for i, t in enumerate(tasks):
                    if not sent[i] and not t.done():
                        t.cancel()
    except BaseException:
        for p, t in zip(prompts, tasks, strict=True):
            if t.done() and not t.cancelled() and t.exception() is None:
                _stash(spec, p, t.result())
            t.cancel()
        raise
    return [_NotSent() if t.cancelled() else (t.exception() or t.result()) for t in tasks]


async def _one_row(spec: _Spec, client: Any, prompt: str, sent: list[bool], i: int) -> _Row:
    if prompt in spec.stash:
        return spec.stash.pop(prompt)  # type: ignore[no-any-return]
    messages = _messages(spec.system, prompt)
    kwargs = spec.params(spec.max_tokens)
    if spec.fmt.api is not None:
        kwargs["response_format"] = spec.fmt.api
    try:
        async with request(tokens=_request_tokens(spec, messages, spec.max_tokens)) as req:
            sent[i] = True
            raw = await client.chat.completions.with_raw_response.create(
                messages=messages, **kwargs
            )
            completion = reply.parsed(raw)
            used = reply.used(completion)
            req.report(headers=raw.headers, tokens=used[0] + used[1])
    except Exception as exc:
        # now, as it leaves request(): a run-stopping error (a refused key) is copied for
        # every other call of the run that it stops (the copies keep its words)
        scrub(exc, spec.source.secrets)
        if reply.status_of(exc) in _ROW_STATUSES:
            return _Row(RowError(f"{type(exc).__name__}: {reply.message(exc)}"))
        raise
    return _Row(reply.answer(spec.fmt, completion), *used, rate_headers(raw.headers) or None)


def _request_tokens(spec: _Spec, messages: list[dict[str, str]], max_tokens: int) -> int:
    """What the provider charges against its token limit: the prompt as it counts it (4 per
    message + 3) and the whole output cap. 0 outside a run (nothing to charge)."""
    if bound() is None:
        return 0
    return _prompt_tokens(spec, messages) + max_tokens


def _prompt_tokens(spec: _Spec, messages: list[dict[str, str]]) -> int:
    """The prompt as the provider counts it: 4 tokens per message + 3, plus the contents."""
    counts = count_tokens([m["content"] for m in messages], spec.model)
    return 3 + sum(4 + n for n in counts)


def _batch_fn(spec: _Spec) -> Callable[[pl.DataFrame], Awaitable[list[Any] | pl.Series]]:
    rf = batchmode.response_format(spec.fmt.schema if spec.fmt.structured else None)
    system = batchmode.system_message(spec.system, spec.fmt.schema)

    async def fn(batch: pl.DataFrame) -> list[Any] | pl.Series:
        prompts = spec.template.render(batch)
        n = len(prompts)
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": batchmode.user_message(prompts)},
        ]
        budget = n * (spec.max_tokens + batchmode.ITEM_OVERHEAD_TOKENS) + 16
        try:
            client = await spec.source.get()
            async with request(tokens=_request_tokens(spec, messages, budget)) as req:
                raw = await client.chat.completions.with_raw_response.create(
                    messages=messages, response_format=rf, **spec.params(budget)
                )
                completion = reply.parsed(raw)
                used = reply.used(completion)
                req.report(headers=raw.headers, tokens=sum(used))
        except BaseException as exc:
            scrub(exc, spec.source.secrets)
            raise
        report_usage(*used, headers=rate_headers(raw.headers) or None)
        choice = completion.choices[0]
        values = batchmode.parse_results(
            choice.message.content, n, truncated=choice.finish_reason == "length"
        )
        fitted = [v if isinstance(v, RowError) else reply.fit(spec.fmt, v) for v in values]
        return reply.column(spec.fmt, fitted)

    return per_request(fn, sends="one")


def _messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    user = {"role": "user", "content": prompt}
    return [{"role": "system", "content": system}, user] if system else [user]


def _worst(outcomes: list[Any]) -> BaseException | None:
    """The exception to raise for a batch: a 429 with the longest retry-after, else the first."""
    failures = [o for o in outcomes if isinstance(o, BaseException)
                and not isinstance(o, (RowError, _NotSent))]
    if not failures:
        return None
    for f in failures:
        if not isinstance(f, Exception):  # CancelledError, KeyboardInterrupt: re-raise as is
            return f
    limited = [f for f in failures if reply.status_of(f) == 429]
    if limited:
        return max(limited, key=_retry_after)
    return failures[0]


def _retry_after(exc: BaseException) -> float:
    from dfbatch.execute._retry import retry_after

    return retry_after(exc) or 0.0


def _stash(spec: _Spec, prompt: str, outcome: _Row) -> None:
    spec.stash[prompt] = outcome
    while len(spec.stash) > _STASH_MAX:
        spec.stash.pop(next(iter(spec.stash)))
