"""The provider's Batch API (OpenAI ``/v1/files`` + ``/v1/batches``): request files and jobs.

An adapter built with ``api="batch"`` (``chat(..., api="batch")``, ``embed(..., api="batch")``)
carries a ``BatchAdapter``: what one row's request body is and how one answer body becomes the
row's value. ``dfbatch.process`` sees it and runs the frame as batch jobs instead of
synchronous calls (``dfbatch.run._batch_api``): it writes one JSONL line per row
(``request_line``), cuts the lines into files that respect the provider's limits
(``split_files``), uploads them, creates one job per file, polls, and reads the output and
error files back (``read_results``).

Examples
--------
>>> import numpy as np
>>> from dfbatch.llm.batch_api import BatchLimits, split_files
>>> limits = BatchLimits(max_requests=3, max_bytes=1_000)
>>> [len(p) for p in split_files(np.full(8, 100), limits)]
[3, 3, 2]
>>> [len(p) for p in split_files(np.full(8, 400), limits)]
[2, 2, 2, 2]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from dfbatch.errors import ConfigError, RowError
from dfbatch.llm.client import ClientSource

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
            "cancelling", "cancelled")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})  # error-line codes of unrun requests
CUSTOM_ID_MAX = 64  # characters: Anthropic's documented cap; OpenAI documents none, so the same
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class BatchLimits:
    """The provider's limits on one batch job, and how dfbatch polls it.

    ``max_requests`` lines and ``max_bytes`` bytes per input file (OpenAI: 50,000 and 200 MB);
    ``max_tokens``: request tokens per file (prompt + output cap; ``None``: no cap).
    ``max_enqueued_tokens``: the model's enqueued-token limit (OpenAI's "batch queue limit",
    which depends on the model and the account's tier; ``None``: none): every file stays
    within it, and the jobs in flight at once together too; a file that does not fit waits
    for a job to end (a job the provider still fails with ``token_limit_exceeded`` goes
    again when another one ends). ``poll_s`` is the first wait between status
    checks, doubling up to ``poll_max_s``. ``discount`` is the batch price against
    synchronous calls (0.5: half price), for the cost comparison.
    """

    max_requests: int = 50_000
    max_bytes: int = 200_000_000
    max_tokens: int | None = None
    max_enqueued_tokens: int | None = None
    completion_window: str = "24h"
    poll_s: float = 2.0
    poll_max_s: float = 120.0
    discount: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"batch limit {name} must be an integer > 0, got {value!r}"
                raise ConfigError(msg)
        for name in ("max_tokens", "max_enqueued_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                msg = f"batch limit {name} must be an integer > 0 or None, got {value!r}"
                raise ConfigError(msg)
        if not 0 < self.poll_s <= self.poll_max_s:
            msg = f"need 0 < poll_s <= poll_max_s, got {self.poll_s}, {self.poll_max_s}"
            raise ConfigError(msg)
        if not 0 < self.discount <= 1:
            msg = f"discount must be in (0, 1] (0.5 = half price), got {self.discount!r}"
            raise ConfigError(msg)

    def next_poll(self, wait: float) -> float:
        """The wait after ``wait``: doubled, capped at ``poll_max_s``."""
        return min(wait * 2, self.poll_max_s)


@dataclass(frozen=True)
class Answer:
    """One row's answer from an output or error line: its value (or ``RowError``) and usage;
    ``resumable``: the provider did not get to it (expired, cancelled) or failed it for a
    passing reason (429, 5xx), so a rerun sends it again."""

    value: Any
    input_tokens: int = 0
    output_tokens: int = 0
    resumable: bool = False


@dataclass
class BatchAdapter:
    """What ``process`` needs to run an adapter as batch jobs.

    ``bodies(frame)`` gives one request body per row (the JSON a synchronous call would post),
    ``answer(body)`` turns one 200 answer body into the row's ``Answer``; ``dtype`` is the
    output column's type (``None``: decided from the values).
    """

    endpoint: str
    model: str
    source: ClientSource
    bodies: Callable[[pl.DataFrame], list[dict[str, Any]]]
    answer: Callable[[dict[str, Any]], Answer]
    dtype: Any = None
    limits: BatchLimits = field(default_factory=BatchLimits)


def custom_id(name: Any, body: dict[str, Any]) -> str:
    """A request's ``custom_id``: ``<name>-<hash of the body>``, within ``CUSTOM_ID_MAX``
    characters of ``[A-Za-z0-9_-]`` (what every provider accepts). ``name`` (the row's
    position or ``key=`` value) is kept when it fits, else replaced by ``k`` + its hash, so
    the id stays stable across runs.

    >>> custom_id(7, {"input": "hi"})
    '7-1931f60355ef'
    >>> custom_id("https://example.com/a page", {"input": "hi"})
    'kb654e3ea869be8d7-1931f60355ef'
    """
    return f"{row_name(name)}-{_sha(json.dumps(body, sort_keys=True))[:12]}"


def row_name(name: Any) -> str:
    """The row part of a ``custom_id``: ``name`` as text when it fits, else ``k`` + its hash."""
    text = str(name)
    if not _SAFE_ID.fullmatch(text) or len(text) > CUSTOM_ID_MAX - 13:
        text = "k" + _sha(text)[:16]
    return text


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> bytes:
    """One JSONL line of an input file (newline included).

    >>> request_line("r0", "/v1/embeddings", {"model": "m", "input": "hi"})
    b'{"custom_id":"r0","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"hi"}}\\n'
    """
    if len(custom_id) > CUSTOM_ID_MAX:
        msg = (f"custom_id {custom_id[:40]!r}... has {len(custom_id)} characters, more than "
               f"the providers' limit of {CUSTOM_ID_MAX}: make it with batch_api.custom_id")
        raise ConfigError(msg)
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def split_files(
    sizes: np.ndarray, limits: BatchLimits, tokens: np.ndarray | None = None
) -> list[np.ndarray]:
    """Cut lines ``0..n-1`` (in order) into files within ``limits``: each file gets at most
    ``max_requests`` lines, ``max_bytes`` bytes (``sizes``) and ``max_tokens`` tokens (and
    ``max_enqueued_tokens``: a file the model's queue could never hold cannot be sent).

    A single line over a limit cannot be sent: ``ConfigError`` (it names the limit).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    costs = np.zeros_like(sizes) if tokens is None else np.asarray(tokens, dtype=np.int64)
    caps = [c for c in (limits.max_tokens, limits.max_enqueued_tokens) if c is not None]
    cap_tokens = min(caps) if caps else int(np.iinfo(np.int64).max)
    too_big = np.flatnonzero((sizes > limits.max_bytes) | (costs > cap_tokens))
    if too_big.size:
        i = int(too_big[0])
        msg = (f"request {i} alone exceeds the batch file limits ({sizes[i]} bytes, "
               f"{costs[i]} tokens; limits {limits.max_bytes} bytes, {cap_tokens} "
               "tokens): shorten the text or raise the limits")
        raise ConfigError(msg)
    parts: list[np.ndarray] = []
    start, n = 0, len(sizes)
    while start < n:
        stop = min(n, start + limits.max_requests)
        nbytes = np.cumsum(sizes[start:stop])
        ntok = np.cumsum(costs[start:stop])
        fits = int(np.searchsorted(nbytes, limits.max_bytes, side="right"))
        fits = min(fits, int(np.searchsorted(ntok, cap_tokens, side="right")))
        stop = start + max(fits, 1)
        parts.append(np.arange(start, stop))
        start = stop
    return parts


def read_results(text: str, adapter: BatchAdapter) -> dict[str, Answer]:
    """Map ``custom_id`` -> ``Answer`` for every line of an output or error file.

    A 200 line is answered by the adapter; an error line (non-200 status, or an ``error``
    object) becomes a ``RowError`` naming the status and the provider's message; a line whose
    answer cannot be read fails only its own row.
    """
    out: dict[str, Answer] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            cid = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            continue  # no custom_id: no row to give it to; that row stays missing
        out[str(cid)] = _answer_line(line, adapter)
    return out


def _answer_line(line: dict[str, Any], adapter: BatchAdapter) -> Answer:
    error = line.get("error")
    response = line.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    if error or status != 200 or not isinstance(body, dict):
        code = error.get("code") if isinstance(error, dict) else None
        passing = code in _NOT_RUN or (isinstance(status, int) and (status == 429 or status >= 500))
        return Answer(RowError(_error_text(error, status, body)), resumable=passing)
    try:
        return adapter.answer(body)
    except Exception as exc:  # a malformed answer fails its row only
        return Answer(RowError(f"unreadable batch answer: {type(exc).__name__}: {exc}"[:300]))


def _error_text(error: Any, status: Any, body: Any) -> str:
    if isinstance(error, dict):
        return f"batch error {error.get('code')}: {error.get('message')}"
    detail = body.get("error") if isinstance(body, dict) else None
    message = detail.get("message") if isinstance(detail, dict) else None
    return f"HTTP {status}: {message or 'no answer body'}"


async def upload(client: Any, data: bytes, filename: str) -> str:
    """Upload one input file (purpose ``batch``); returns its file id."""
    file = await client.files.create(file=(filename, data), purpose="batch")
    return str(file.id)


async def create(client: Any, file_id: str, adapter: BatchAdapter, tag: str) -> Any:
    """Create the job for an uploaded file; ``tag`` (metadata ``dfbatch``) finds it again."""
    return await client.batches.create(
        input_file_id=file_id, endpoint=adapter.endpoint,
        completion_window=adapter.limits.completion_window, metadata={"dfbatch": tag},
    )


_SKEW_S = 600.0  # provider and local clocks may disagree by this much


async def find_job(client: Any, file_id: str, since: float = 0.0) -> Any | None:
    """The job already created for ``file_id`` (a create whose answer was lost), or None.
    Jobs come newest first; the search stops at those older than ``since`` (epoch seconds)."""
    async for job in client.batches.list(limit=100):
        if job.input_file_id == file_id:
            return job
        if job.created_at < since - _SKEW_S:
            break
    return None


async def find_file(client: Any, filename: str, since: float = 0.0) -> str | None:
    """The id of an uploaded file named ``filename`` (an upload whose answer was lost); the
    search (newest first) stops at files older than ``since`` (epoch seconds)."""
    async for file in client.files.list(purpose="batch", order="desc", limit=100):
        if file.filename == filename and file.purpose == "batch":
            return str(file.id)
        if file.created_at < since - _SKEW_S:
            break
    return None


async def download(client: Any, file_id: str | None) -> str:
    """The text of an output / error file ('' for none)."""
    if not file_id:
        return ""
    content = await client.files.content(file_id)
    return str(content.text)
