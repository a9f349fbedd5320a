"""The chat adapter against hostile servers: failing rows, malformed or odd replies."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import polars as pl
import pytest

import dfbatch  # noqa: F401 - registers df.batch
from dfbatch.errors import ConfigError
from dfbatch.llm import chat

ROWS = pl.DataFrame({"text": [f"Row number {i} is unique." for i in range(40)]})


@pytest.mark.parametrize("config", [{"error_rate": 0.6, "seed": 1},
                                    {"overload_rate": 0.5, "seed": 3}])
def test_rows_answered_before_the_batch_gave_up_keep_their_answers(make_sim, config):
    server = make_sim(**config)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=32, base_url=server.url)
    events: list[Any] = []
    out = ROWS.batch.process(fn, progress=False, max_attempts=2, backoff_max=0.05,
                             on_event=events.append)
    answered = server.stats.snapshot().by_status.get(200, 0)
    ok = out.filter(pl.col("error").is_null())
    assert ok.height == answered  # every answer the server sent (and billed) is kept
    assert ok["output"].null_count() == 0
    failed = out.filter(pl.col("error").is_not_null())
    assert failed["output"].null_count() == failed.height
    assert not any(getattr(e, "bisected", False) for e in events)  # not bisected


# -- a scripted server ------------------------------------------------------------------------
def _completion(content: Any, finish_reason: str = "stop") -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "finish_reason": finish_reason,
                                    "message": {"role": "assistant", "content": content}}]}
                      ).encode()


REPLIES: dict[str, tuple[int, str, bytes]] = {
    "garbage": (200, "application/json", b"{not json"),
    "html": (200, "text/html", b"<html>502 Bad Gateway</html>"),
    "empty_choices": (200, "application/json", json.dumps(
        {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
    ).encode()),
    "200_error_body": (200, "application/json", b'{"error":{"message":"internal","code":500}}'),
    "null_content": (200, "application/json", _completion(None)),
    "content_filter": (200, "application/json", _completion("", "content_filter")),
    "length": (200, "application/json", _completion("trunc", "length")),
    "length_json": (200, "application/json", _completion('{"a": 1', "length")),
    "429forever": (429, "application/json",
                   b'{"error":{"message":"slow down","code":"rate_limit_exceeded"}}'),
}


@pytest.fixture
def scripted() -> Iterator[Callable[[str], tuple[str, list[int]]]]:
    servers: list[ThreadingHTTPServer] = []

    def make(mode: str) -> tuple[str, list[int]]:
        status, ctype, body = REPLIES[mode]
        hits = [0]

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                hits[0] += 1
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", hits

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _process(url: str, **kw: Any) -> pl.DataFrame:
    frame = pl.DataFrame({"text": [f"row {i}" for i in range(3)]})
    fn = chat("m", "S: {text}", max_tokens=8, base_url=url, **kw)
    return frame.batch.process(fn, progress=False, timeout=5, max_attempts=2, backoff_max=0.01)


@pytest.mark.parametrize("mode", ["garbage", "html", "empty_choices", "200_error_body"])
def test_a_malformed_reply_is_a_clear_transient_error(scripted, mode):
    url, hits = scripted(mode)
    out = _process(url)
    assert hits[0] == 6  # 3 rows, retried once each: transient
    errors = out["error"].to_list()
    assert all(e.startswith("MalformedReplyError: the provider's reply was malformed (HTTP 200")
               for e in errors), errors
    assert out["output"].null_count() == 3


@pytest.mark.parametrize(("mode", "error"), [
    ("null_content", "RowError: empty answer, finish_reason=stop"),
    ("content_filter", "RowError: the provider's content filter blocked the answer"),
])
def test_an_empty_or_blocked_answer_is_a_row_error(scripted, mode, error):
    url, hits = scripted(mode)
    out = _process(url)
    assert hits[0] == 3  # a row error: not retried
    assert out["output"].null_count() == 3
    assert all(e.startswith(error) for e in out["error"].to_list())


def test_an_answer_cut_at_max_tokens_is_kept_as_text(scripted):
    url, _ = scripted("length")
    out = _process(url)
    assert out["output"].to_list() == ["trunc"] * 3 and out["error"].null_count() == 3


def test_a_structured_answer_cut_at_max_tokens_is_a_row_error(scripted):
    url, _ = scripted("length_json")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = _process(url, response_format=schema)
    assert out["output"].null_count() == 3
    assert all("(cut at max_tokens)" in e for e in out["error"].to_list())


def test_waiting_for_the_runs_own_limits_is_no_call_timeout(make_sim):
    # every answer is an instant 500: the breaker opens and holds the batch's other requests
    # client-side; that wait is not the call's timeout, and the rows keep the real error
    server = make_sim(error_rate=1.0)
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=16, base_url=server.url)
    out = ROWS.head(8).batch.process(fn, progress=False, timeout=0.3, max_attempts=2,
                                     backoff_max=0.01)
    errors = out["error"].to_list()
    assert all(e.startswith("InternalServerError: Error code: 500") for e in errors), errors


def test_a_tpm_smaller_than_one_request_is_refused_before_any_call(sim):
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=16, base_url=sim.url)
    with pytest.raises(ConfigError, match=r"tpm=10 is smaller than the smallest request"):
        ROWS.head(3).batch.process(fn, progress=False, tpm=10)
    assert sim.stats.snapshot().requests == 0
    out = ROWS.head(3).batch.process(fn, progress=False, tpm=10_000)  # one that fits runs
    assert out["error"].null_count() == 3


def test_requests_paced_by_the_runs_rpm_do_not_time_out(make_sim):
    # rpm=240: a request every 0.25 s, longer than the 0.1 s call timeout; only the time a
    # request is out counts, so every row is answered on its first attempt
    server = make_sim()
    fn = chat("sim-chat", "Summarize: {text}", max_tokens=16, base_url=server.url)
    out = ROWS.head(8).batch.process(fn, progress=False, timeout=0.1, rpm=240, max_attempts=1)
    assert out["error"].to_list() == [None] * 8
