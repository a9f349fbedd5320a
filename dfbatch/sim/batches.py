"""The simulator's ``/v1/batches``: OpenAI's Batch API, offline (files: ``dfbatch.sim.files``).

``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``, ``metadata``),
``GET /v1/batches`` (cursor pages), ``GET /v1/batches/{id}`` and
``POST /v1/batches/{id}/cancel``.

A batch is a pure function of time (simulated seconds, ``SimConfig.time_scale`` aware): it is
``validating`` for the first 2% of ``batch_completion_s``, then ``in_progress`` with its lines
finishing at an even pace (``request_counts`` say how many), ``finalizing`` for 2% more, then
``completed``. If the completion window (``batch_window_s``, else the ``completion_window``
asked for, ``"24h"``) ends first, the batch is ``expired``: the lines done by then are in the
output file, the others are in no file at all. ``cancel`` stops it the same way
(``cancelling``, then ``cancelled`` at the next look). Per line: a request whose input holds
the poison marker gets a 400 line in the error file; a line that is not a valid request gets
an error line too. A file of more than ``batch_max_requests`` lines (or with a duplicate
``custom_id``, or one over 64 characters) makes its batch ``failed`` at validation, with
``errors``; so does a batch over the model's ``batch_enqueued_tokens`` (with the batches of
that model not over yet), code ``token_limit_exceeded``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dfbatch.sim.config import SimConfig
from dfbatch.sim.embedding import embed_texts, encode_vector
from dfbatch.sim.files import FileStore, error, error_body, missing, page
from dfbatch.sim.tokenizer import chat_prompt_tokens, encoder_for, truncate

Answerer = Callable[[list[Any], Any, str], str]  # (messages, response_format, drop) -> text
_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
_WINDOWS = {"24h": 86_400.0}
_CUSTOM_ID_MAX = 64  # as Anthropic documents; a longer one fails the batch at validation
_EDGE = 0.02  # share of the completion time spent validating, and again finalizing


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    window: str
    metadata: dict[str, Any] | None
    created: float  # simulated seconds since server start
    created_at: int
    lines: list[dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    stopped: float | None = None  # when cancel was asked (simulated seconds)
    done_view: dict[str, Any] | None = None  # frozen once terminal
    model: str = ""
    tokens: int = 0  # prompt tokens of its lines, against the model's enqueued-token limit


class BatchStore:
    """The batch jobs of one simulator (and its ``FileStore``); handlers take ``(request, t)``."""

    def __init__(self, config: SimConfig, sim_now: Callable[[], float], answer: Answerer,
                 check_key: Callable[[web.Request], None]) -> None:
        self.config = config
        self._now = sim_now
        self._answer = answer
        self._check_key = check_key
        self.files = FileStore(config, check_key)
        self.batches: dict[str, _Batch] = {}

    def routes(self, router: web.UrlDispatcher, guard: Callable[[str, Any], Any]) -> None:
        router.add_post("/v1/files", guard("files", self.files.upload))
        router.add_get("/v1/files", guard("files", self.files.list_files))
        router.add_get("/v1/files/{id}", guard("files", self.files.file))
        router.add_get("/v1/files/{id}/content", guard("files", self.files.content))
        router.add_post("/v1/batches", guard("batches", self.create))
        router.add_get("/v1/batches", guard("batches", self.list_batches))
        router.add_get("/v1/batches/{id}", guard("batches", self.retrieve))
        router.add_post("/v1/batches/{id}/cancel", guard("batches", self.cancel))

    # -- batches -------------------------------------------------------------------------
    async def create(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "request body is not valid JSON")
        file = self.files.get(str(body.get("input_file_id")))
        if file is None:
            return error(400, f"no file with id {body.get('input_file_id')!r}",
                          param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in _ENDPOINTS:
            return error(400, f"endpoint must be one of {list(_ENDPOINTS)}", param="endpoint")
        window = body.get("completion_window")
        if window not in _WINDOWS:
            return error(400, "completion_window must be '24h'", param="completion_window")
        batch = _Batch(f"batch_sim_{len(self.batches) + 1}", file.id, endpoint, window,
                       body.get("metadata"), self._now(), int(time.time()), [])
        batch.lines, batch.errors = _validate(file.data, endpoint, self.config.batch_max_requests)
        if not batch.errors and self.config.batch_enqueued_tokens is not None:
            batch.tokens = sum(_prompt_tokens(line) for line in batch.lines)
            batch.model = str(batch.lines[0]["body"].get("model")) if batch.lines else ""
            batch.errors = self._over_limit(batch)
        batch.created = self._now()  # its clock starts once it is checked
        self.batches[batch.id] = batch
        return web.json_response(self._view(batch))

    def _over_limit(self, batch: _Batch) -> list[dict[str, Any]]:
        """The ``token_limit_exceeded`` error of a batch the model's queue cannot take."""
        limit = self.config.batch_enqueued_tokens or 0
        queued = sum(b.tokens for b in self.batches.values() if b.model == batch.model
                     and self._view(b)["status"] in ("validating", "in_progress", "finalizing"))
        if queued + batch.tokens <= limit:
            return []
        why = (f"Enqueued token limit reached for {batch.model}. Limit: {limit:,} enqueued "
               f"tokens ({queued:,} enqueued, this batch {batch.tokens:,}). Please try again "
               "once some in_progress batches have been completed.")
        return [_line_error("token_limit_exceeded", why, None)]

    async def list_batches(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        views = [self._view(b) for b in reversed(self.batches.values())]  # newest first
        return page(request, views)

    async def retrieve(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        found = self.batches.get(request.match_info["id"])
        return web.json_response(self._view(found)) if found else missing("batch", request)

    async def cancel(self, request: web.Request, t: float) -> web.Response:
        self._check_key(request)
        found = self.batches.get(request.match_info["id"])
        if found is None:
            return missing("batch", request)
        view = self._view(found)
        if view["status"] in ("validating", "in_progress", "finalizing"):
            found.stopped = self._now()
            view = {**view, "status": "cancelling", "cancelling_at": int(time.time())}
        return web.json_response(view)

    # -- the state of a batch at this moment -----------------------------------------------
    def _view(self, b: _Batch) -> dict[str, Any]:
        if b.done_view is not None:
            return b.done_view
        c = self.config
        total = c.batch_completion_s
        window = c.batch_window_s if c.batch_window_s is not None else _WINDOWS[b.window]
        age = self._now() - b.created
        n = len(b.lines)
        view: dict[str, Any] = {
            "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": None,
            "input_file_id": b.input_file_id, "completion_window": b.window,
            "created_at": b.created_at, "expires_at": b.created_at + int(window),
            "metadata": b.metadata, "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": n, "completed": 0, "failed": 0},
        }
        if b.errors:
            view["errors"] = {"object": "list", "data": b.errors}
            return self._finish(b, view, "failed", 0)
        if b.stopped is not None:
            return self._finish(b, view, "cancelled", self._done_at(b, b.stopped - b.created))
        if age >= window and total > window:
            return self._finish(b, view, "expired", self._done_at(b, window))
        if age < _EDGE * total:
            return {**view, "status": "validating"}
        if age < total:
            done = self._done_at(b, age)
            view["request_counts"] = self._counts(b, done)
            started = b.created_at + _EDGE * total * c.time_scale
            return {**view, "status": "in_progress", "in_progress_at": int(started)}
        if age < (1 + _EDGE) * total:
            view["request_counts"] = self._counts(b, n)
            return {**view, "status": "finalizing"}
        return self._finish(b, view, "completed", n)

    def _done_at(self, b: _Batch, age: float) -> int:
        total = self.config.batch_completion_s
        start = _EDGE * total
        if age <= start:
            return 0
        share = (age - start) / max(total - start, 1e-12)
        return min(len(b.lines), int(len(b.lines) * share))

    def _counts(self, b: _Batch, done: int) -> dict[str, int]:
        failed = sum(1 for line in b.lines[:done] if self._is_poison(line))
        return {"total": len(b.lines), "completed": done - failed, "failed": failed}

    def _is_poison(self, line: dict[str, Any]) -> bool:
        marker = self.config.poison_marker
        return bool(marker) and marker in json.dumps(line.get("body"), ensure_ascii=False)

    def _finish(self, b: _Batch, view: dict[str, Any], status: str, done: int) -> dict[str, Any]:
        """Answer the first ``done`` lines, write the output / error files, freeze the view."""
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for line in b.lines[:done]:
            status_code, body = self._respond(line)
            record = {"id": f"batch_req_{b.id}_{line['custom_id']}",
                      "custom_id": line["custom_id"], "error": None,
                      "response": {"status_code": status_code, "request_id": "sim",
                                   "body": body}}
            (out if status_code == 200 else err).append(record)
        for name, records in (("output_file_id", out), ("error_file_id", err)):
            if records:
                data = "".join(json.dumps(r) + "\n" for r in records).encode()
                view[name] = self.files.add(f"{b.id}_{name}.jsonl", "batch_output", data).id
        view["request_counts"] = {"total": len(b.lines), "completed": len(out),
                                  "failed": len(err)}
        view["status"] = status
        view[f"{status}_at"] = int(time.time())
        b.done_view = view
        return view

    def _respond(self, line: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = line.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return 400, error_body("each request body must be an object with a model")
        if self._is_poison(line):
            msg = "Invalid content: the input contains the simulator's poison marker"
            return 400, error_body(msg, code="poison")
        if line["url"] == "/v1/embeddings":
            return 200, _embedding(body, self.config.embedding_dimensions)
        return self._chat(body)

    def _chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        if not messages:
            return 400, error_body("messages must be a non-empty list")
        model = body["model"]
        enc = encoder_for(model)
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        cap = cap if isinstance(cap, int) and cap > 0 else self.config.default_max_tokens
        text = self._answer(messages, body.get("response_format"), self.config.drop_marker)
        text, used, cut = truncate(enc, text, cap)
        prompt = chat_prompt_tokens(enc, messages)
        message = {"role": "assistant", "content": text, "refusal": None}
        return 200, {
            "id": "chatcmpl-sim-batch", "object": "chat.completion", "created": 0,
            "model": model, "system_fingerprint": "dfbatch-sim",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "length" if cut else "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": used,
                      "total_tokens": prompt + used},
        }


def _validate(data: bytes, endpoint: str, max_requests: int) -> tuple[list[Any], list[Any]]:
    """The request lines of an input file, or the validation errors that fail its batch."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append(_line_error("invalid_json_line", "line is not valid JSON", number))
            continue
        cid = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(cid, str) or cid in seen:
            why = "custom_id missing or not unique"
            errors.append(_line_error("duplicate_custom_id", why, number))
            continue
        if line.get("url") != endpoint or line.get("method") != "POST":
            why = f"method must be POST and url must be the batch's endpoint {endpoint}"
            errors.append(_line_error("mismatched_endpoint", why, number))
            continue
        if len(cid) > _CUSTOM_ID_MAX:
            why = f"custom_id has {len(cid)} characters, more than {_CUSTOM_ID_MAX}"
            errors.append(_line_error("invalid_custom_id", why, number))
            continue
        seen.add(cid)
        lines.append(line)
    if len(lines) > max_requests:
        why = f"the file holds {len(lines)} requests, more than the limit of {max_requests}"
        errors.append(_line_error("too_many_requests", why, None))
    return lines, errors


def _prompt_tokens(line: dict[str, Any]) -> int:
    """The prompt tokens of one request line (what a model's enqueued-token limit counts)."""
    body = line.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return 0
    enc = encoder_for(body["model"])
    if line.get("url") == "/v1/embeddings":
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else [str(x) for x in raw or []]
        return sum(len(enc.encode_ordinary(x)) for x in texts)
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return chat_prompt_tokens(enc, messages) if messages else 0


def _embedding(body: dict[str, Any], dims: int) -> dict[str, Any]:
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else [str(x) for x in raw or []]
    vectors = embed_texts(texts, int(body.get("dimensions") or dims))
    enc = encoder_for(str(body["model"]))
    tokens = sum(len(enc.encode_ordinary(x)) for x in texts)
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, "float")}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _line_error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}
