"""The Batch API: the simulator's /v1/files + /v1/batches, and process with chat(api="batch")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import dfbatch
from dfbatch.errors import ConfigError, PartialResultWarning, RowError
from dfbatch.llm import chat
from dfbatch.llm.batch_api import BatchLimits, read_results, split_files
from dfbatch.sim import serve

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
FAST = BatchLimits(poll_s=0.005, poll_max_s=0.05)


def line(i: int, text: str, url: str = "/v1/chat/completions") -> dict[str, Any]:
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def wait_for(client: Any, batch_id: str, statuses: set[str], limit_s: float = 20.0) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.005)


def read_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def batch_inputs(client: Any) -> list[list[dict[str, Any]]]:
    """The request lines of every batch created on the simulator, oldest first."""
    jobs = list(reversed(list(client.batches.list())))
    return [read_lines(client, job.input_file_id) for job in jobs]


def uploads(client: Any) -> int:
    return sum(1 for f in client.files.list() if f.purpose == "batch")


# -- the simulator ---------------------------------------------------------------------------
def test_sim_files_round_trip_with_the_sdk() -> None:
    with serve(time_scale=0.001) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        data = jsonl([line(0, "Summarize: a. b.")])
        f = client.files.create(file=("in.jsonl", data), purpose="batch")
        assert (f.bytes, f.filename, f.purpose) == (len(data), "in.jsonl", "batch")
        assert client.files.retrieve(f.id).id == f.id
        assert client.files.content(f.id).content == data
        assert [x.id for x in client.files.list()] == [f.id]
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-nope")


def test_sim_batch_completes_with_outputs_and_per_line_errors() -> None:
    with serve(time_scale=0.001, batch_completion_s=20) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        lines = [line(0, "Summarize: Polars is fast. It is Rust."), line(1, "x <<poison>>"),
                 line(2, "Summarize: Arrow.")]
        f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"k": "v"})
        assert created.status == "validating"
        assert created.metadata == {"k": "v"}
        done = wait_for(client, created.id, {"completed"})
        assert done.status == "completed"
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)
        outputs = read_lines(client, done.output_file_id)
        errors = read_lines(client, done.error_file_id)
        assert [x["custom_id"] for x in outputs] == ["r0", "r2"]
        answer = outputs[0]["response"]["body"]["choices"][0]["message"]["content"]
        assert answer == "Polars is fast."
        assert [x["custom_id"] for x in errors] == ["r1"]
        assert errors[0]["response"]["status_code"] == 400
        assert [b.id for b in client.batches.list()] == [created.id]


def test_sim_batch_expires_with_partial_output() -> None:
    with serve(time_scale=0.001, batch_completion_s=100, batch_window_s=51) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        lines = [line(i, f"Summarize: row {i}.") for i in range(10)]
        f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        done = wait_for(client, b.id, {"expired"})
        assert done.status == "expired" and done.expired_at is not None
        got = [x["custom_id"] for x in read_lines(client, done.output_file_id)]
        assert got == [f"r{i}" for i in range(5)]  # (51 - 2) / 98 of the lines were done
        assert done.error_file_id is None  # the others are in no file at all


def test_sim_cancel_stops_the_batch() -> None:
    with serve(time_scale=0.001, batch_completion_s=1e6) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        f = client.files.create(file=("in.jsonl", jsonl([line(0, "a")])), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert client.batches.cancel(b.id).status == "cancelling"
        after = client.batches.retrieve(b.id)
        assert after.status == "cancelled" and after.output_file_id is None


def test_sim_limits_refuse_big_files_and_fail_long_ones() -> None:
    with serve(time_scale=0.001, batch_max_file_bytes=2_000, batch_max_requests=3) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        big = jsonl([line(i, "x" * 200) for i in range(20)])
        with pytest.raises(openai.BadRequestError, match="too large"):
            client.files.create(file=("big.jsonl", big), purpose="batch")
        four = jsonl([line(i, "x") for i in range(4)])
        f = client.files.create(file=("four.jsonl", four), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert b.status == "failed"
        assert b.errors.data[0].code == "too_many_requests"
        wrong = jsonl([line(0, "x", url="/v1/embeddings")])
        f = client.files.create(file=("wrong.jsonl", wrong), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert b.status == "failed" and b.errors.data[0].line == 1


def test_sim_rejects_bad_batch_settings() -> None:
    with pytest.raises(ConfigError, match="batch_max_requests"):
        serve(batch_max_requests=0)
    with pytest.raises(ConfigError, match="batch_completion_s"):
        serve(batch_completion_s=-1)


# -- planning the files ----------------------------------------------------------------------
def test_split_files_respects_every_limit_and_keeps_order() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 500, 2_000)
    tokens = rng.integers(10, 100, 2_000)
    limits = BatchLimits(max_requests=70, max_bytes=9_000, max_tokens=2_500)
    parts = split_files(sizes, limits, tokens)
    assert np.array_equal(np.concatenate(parts), np.arange(2_000))
    for p in parts:
        assert len(p) <= 70 and sizes[p].sum() <= 9_000 and tokens[p].sum() <= 2_500
    with pytest.raises(ConfigError, match="alone exceeds"):
        split_files(np.array([10, 20_000]), limits)


def test_a_malformed_output_line_fails_only_its_row() -> None:
    fn = chat("sim-chat", base_url="http://127.0.0.1:9/v1", api="batch")
    good = {"custom_id": "a", "response": {"status_code": 200, "body": {
        "id": "x", "object": "chat.completion", "created": 0, "model": "sim-chat",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "fine"}}]}}}
    bad = {"custom_id": "b", "response": {"status_code": 200, "body": {"choices": "garbage"}}}
    text = json.dumps(good) + "\n" + json.dumps(bad) + "\nnot json\n"
    got = read_results(text, fn.dfbatch_batch_api)
    assert got["a"].value == "fine"
    assert isinstance(got["b"].value, RowError) and "unreadable batch answer" in str(got["b"].value)
    assert set(got) == {"a", "b"}


def test_chat_api_batch_checks_its_arguments() -> None:
    with pytest.raises(ConfigError, match="api must be"):
        chat("m", base_url="http://x/v1", api="bulk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mode='per_row'"):
        chat("m", base_url="http://x/v1", api="batch", mode="batch")
    with pytest.raises(ConfigError, match="max_requests"):
        BatchLimits(max_requests=0)


# -- process with api="batch" ----------------------------------------------------------------
def test_ten_thousand_rows_split_within_limits_each_answered_once(tmp_path: Path) -> None:
    n = 10_000
    df = pl.DataFrame({"text": [f"t{i}" for i in range(n)]})
    limits = BatchLimits(max_requests=1_500, max_bytes=150_000, poll_s=0.005, poll_max_s=0.05)
    with serve(time_scale=0.0001, batch_completion_s=10) as url:
        fn = chat("sim-chat", "{text}", max_tokens=4, base_url=url, api="batch",
                  batch_limits=limits)
        out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
        client = openai.OpenAI(base_url=url, api_key="x")
        files = [client.files.content(f.id).content for f in client.files.list()
                 if f.purpose == "batch"]
    assert len(files) >= 7  # 10,000 / 1,500 requests and the byte limit
    seen: list[str] = []
    for data in files:
        lines = data.splitlines()
        assert len(lines) <= 1_500 and len(data) <= 150_000
        seen += [json.loads(x)["custom_id"] for x in lines]
    assert len(seen) == n and len(set(seen)) == n  # every row sent exactly once
    assert out.height == n and out["error"].null_count() == n
    assert out["output"].to_list() == df["text"].to_list()  # each answer on its own row


def test_per_row_errors_are_values_and_retry_errors_resends_only_them(tmp_path: Path) -> None:
    texts = ["one.", "bad <<poison>>", "three.", "worse <<poison>>"]
    df = pl.DataFrame({"text": texts})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
        assert out["output"].to_list() == ["one.", None, "three.", None]
        assert out["error"].to_list()[0] is None
        assert "HTTP 400" in out["error"][1] and "poison" in out["error"][1]
        again = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
        assert again.equals(out) and len(batch_inputs(client)) == 1  # nothing resent
        dfbatch.process(df, fn, checkpoint=tmp_path, retry_errors=True, progress=False)
        inputs = batch_inputs(client)
        assert len(inputs) == 2
        assert [x["body"]["messages"][0]["content"] for x in inputs[1]] == [texts[1], texts[3]]


def test_expired_rows_are_marked_and_a_rerun_submits_only_them(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": [f"Row {i}." for i in range(10)]})
    with serve(time_scale=0.001, batch_completion_s=100, batch_window_s=51) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
    errors = out["error"].to_list()
    assert errors[:5] == [None] * 5
    assert all(e.startswith("batch_expired") for e in errors[5:])
    assert out["output"].null_count() == 5
    with serve(time_scale=0.001, batch_completion_s=5) as url2:
        fn2 = chat("sim-chat", "{text}", max_tokens=8, base_url=url2, api="batch",
                   batch_limits=FAST)
        final = dfbatch.process(df, fn2, checkpoint=tmp_path, progress=False)
        inputs = batch_inputs(openai.OpenAI(base_url=url2, api_key="x"))
    assert [len(x) for x in inputs] == [5]  # only the expired rows went again
    assert final["error"].null_count() == 10
    assert final["output"].to_list() == df["text"].to_list()


_KILLER = """
import os, signal, sys, polars as pl, dfbatch
from dfbatch.llm import batch_api, chat
real_upload, real_create = batch_api.upload, batch_api.create
async def upload(*args, **kwargs):
    file_id = await real_upload(*args, **kwargs)
    if sys.argv[3] == "in_upload":  # uploaded, and its id not journaled yet
        os.kill(os.getpid(), signal.SIGKILL)
    return file_id
async def create(*args, **kwargs):
    if sys.argv[3] == "after_upload":
        os.kill(os.getpid(), signal.SIGKILL)
    job = await real_create(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # created, and not journaled yet: the worst moment
batch_api.upload, batch_api.create = upload, create
df = pl.DataFrame({"text": [f"Row {i}." for i in range(30)]})
limits = batch_api.BatchLimits(max_requests=100, poll_s=0.005)
fn = chat("sim-chat", "{text}", max_tokens=8, base_url=sys.argv[1], api="batch",
          batch_limits=limits)
dfbatch.process(df, fn, checkpoint=sys.argv[2], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["in_upload", "after_upload", "after_create"])
def test_kill_9_then_rerun_polls_and_never_resubmits(tmp_path: Path, moment: str) -> None:
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(_KILLER))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpt = tmp_path / "ckpt"
    df = pl.DataFrame({"text": [f"Row {i}." for i in range(30)]})
    with serve(time_scale=0.001, batch_completion_s=20) as url:
        proc = subprocess.run([sys.executable, str(script), url, str(ckpt), moment], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == -9, proc.stderr
        client = openai.OpenAI(base_url=url, api_key="x")
        assert uploads(client) == 1
        assert len(list(client.batches.list())) == (1 if moment == "after_create" else 0)
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        out = dfbatch.process(df, fn, checkpoint=ckpt, progress=False)
        assert uploads(client) == 1 and len(list(client.batches.list())) == 1
    assert out["error"].null_count() == 30
    assert out["output"].to_list() == df["text"].to_list()


def test_stop_while_waiting_returns_what_is_collected(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": ["Summarize: a.", "Summarize: b."]})
    with serve(time_scale=0.001, batch_completion_s=1e6) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)

        def stop_at_once(run: Any) -> None:
            run.stop()

        from dfbatch.run import _batch_api

        original = _batch_api._BatchRun._submit

        async def submit_then_stop(self: Any, client: Any, entry: Any, **kw: Any) -> None:
            await original(self, client, entry, **kw)
            stop_at_once(self)

        _batch_api._BatchRun._submit = submit_then_stop  # type: ignore[method-assign]
        try:
            with pytest.warns(PartialResultWarning, match="still running"):
                out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
        finally:
            _batch_api._BatchRun._submit = original  # type: ignore[method-assign]
        assert out["error"].to_list() == [_batch_api._STILL_RUNNING] * 2
        client = openai.OpenAI(base_url=url, api_key="x")
        assert len(list(client.batches.list())) == 1


def test_error_lines_of_unrun_or_passing_failures_are_resumable() -> None:
    fn = chat("sim-chat", base_url="http://127.0.0.1:9/v1", api="batch")
    lines = [
        {"custom_id": "expired", "response": None,
         "error": {"code": "batch_expired", "message": "not run in time"}},
        {"custom_id": "busy", "response": {"status_code": 500, "body": {}}, "error": None},
        {"custom_id": "bad", "response": {"status_code": 400, "body": {
            "error": {"message": "no"}}}, "error": None},
    ]
    got = read_results("\n".join(json.dumps(x) for x in lines), fn.dfbatch_batch_api)
    assert [got[k].resumable for k in ("expired", "busy", "bad")] == [True, True, False]
    assert str(got["bad"].value) == "HTTP 400: no"
    assert str(got["expired"].value) == "batch error batch_expired: not run in time"


def test_embed_api_batch_gives_the_vectors_of_a_synchronous_run(tmp_path: Path) -> None:
    from dfbatch.llm import embed

    df = pl.DataFrame({"text": ["the cat sat", "a dog ran", "polars"]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        sync = dfbatch.process(df, embed("sim-embed", dimensions=8, base_url=url),
                               progress=False)
        fn = embed("sim-embed", dimensions=8, base_url=url, api="batch", batch_limits=FAST)
        out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
    assert out["output"].dtype == pl.List(pl.Float32)
    assert out["output"].to_list() == sync["output"].to_list()


def test_without_checkpoint_the_journal_sits_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    df = pl.DataFrame({"text": ["one.", "two."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        first = dfbatch.process(df, fn, progress=False)
        again = dfbatch.process(df, fn, progress=False)
        client = openai.OpenAI(base_url=url, api_key="x")
        assert len(list(client.batches.list())) == 1  # the rerun read the journal
    assert again.equals(first)
    assert len(list((tmp_path / ".dfbatch" / "batch_api").glob("*/journal.json"))) == 1


def test_a_journal_of_another_run_is_refused_unless_overwritten(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": ["one."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        def fn(prompt: str) -> Any:
            return chat("sim-chat", prompt, max_tokens=8, base_url=url, api="batch",
                        batch_limits=FAST)

        dfbatch.process(df, fn("{text}"), checkpoint=tmp_path, progress=False)
        with pytest.raises(ConfigError, match="another run"):
            dfbatch.process(df, fn("Say: {text}"), checkpoint=tmp_path, progress=False)
        out = dfbatch.process(df, fn("Say: {text}"), checkpoint=tmp_path, resume="overwrite",
                              progress=False)
    assert out["error"].to_list() == [None]


def test_polling_rides_out_passing_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openai.resources.batches import AsyncBatches

    real = AsyncBatches.retrieve
    calls = {"n": 0}

    async def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            request = __import__("httpx").Request("GET", "http://sim")
            raise openai.APIConnectionError(request=request)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncBatches, "retrieve", flaky)
    df = pl.DataFrame({"text": ["one.", "two."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
    assert calls["n"] > 3 and out["output"].to_list() == ["one.", "two."]


def test_cli_run_batch_api_then_jobs_list_collect_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from dfbatch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pl.DataFrame({"text": ["one.", "two.", "x <<poison>>"]}).write_parquet("in.parquet")
    runner = CliRunner()
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        r = runner.invoke(main, ["run", "in.parquet", "--model", "sim-chat", "--base-url", url,
                                 "--batch-api", "--out", "out.parquet", "--no-progress"])
        assert r.exit_code == 3, r.output  # one row failed (the poison line)
        out = pl.read_parquet("out.parquet")
        assert out["output"].to_list() == ["one.", "two.", None]
        r = runner.invoke(main, ["jobs", "--base-url", url, "list"])
        assert r.exit_code == 0 and "2/3 done, 1 failed" in r.output and "completed" in r.output
        job_id = r.output.split()[0]
        r = runner.invoke(main, ["jobs", "--base-url", url, "collect", job_id, "--out", "a.jsonl"])
        assert r.exit_code == 0 and "wrote 3 lines" in r.output
        assert len(Path("a.jsonl").read_text().splitlines()) == 3
        r = runner.invoke(main, ["jobs", "--base-url", url, "cancel", job_id])
        assert r.exit_code == 0 and "completed" in r.output  # over already: nothing to cancel
        r = runner.invoke(main, ["run", "in.parquet", "--fn", "x:y", "--batch-api",
                                 "--out", "o.parquet"])
        assert r.exit_code == 2 and "--batch-api needs --model" in r.output


def test_plan_summary_shows_the_batch_price_beside_the_synchronous_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dfbatch.cli import main

    df = pl.DataFrame({"text": ["hello world"] * 10})
    planned = dfbatch.plan(df)
    s = dfbatch.summary(planned, price_in_per_1k=1.0, price_out_per_1k=2.0, batch_discount=0.5)
    assert s.cost is not None and s.batch_cost == pytest.approx(s.cost / 2)
    assert f"batch API: ${s.cost / 2:,.4f} vs ${s.cost:,.4f} synchronous" in str(s)
    assert "batch API" not in str(dfbatch.summary(planned, price_in_per_1k=1.0))
    with pytest.raises(ConfigError, match="batch_discount"):
        dfbatch.summary(planned, price_in_per_1k=1.0, batch_discount=2)
    df.write_parquet(tmp_path / "in.parquet")
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "in.parquet"), "--price-in", "1",
                                  "--price-out", "2", "--batch-discount", "0.5"])
    assert r.exit_code == 0 and "batch API: $" in r.output and "saves $" in r.output


def test_key_names_rows_so_a_reordered_frame_is_not_sent_again(tmp_path: Path) -> None:
    df = pl.DataFrame({"id": ["a", "b", "c"], "text": ["one.", "two.", "three."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        dfbatch.process(df, fn, checkpoint=tmp_path, key="id", progress=False)
        shuffled = df.reverse()
        out = dfbatch.process(shuffled, fn, checkpoint=tmp_path, key="id", progress=False)
        assert len(list(openai.OpenAI(base_url=url, api_key="x").batches.list())) == 1
        with pytest.raises(ConfigError, match="unique"):
            dfbatch.process(pl.DataFrame({"id": ["a", "a"], "text": ["x", "y"]}), fn,
                            checkpoint=tmp_path / "other", key="id", progress=False)
    assert out["output"].to_list() == ["three.", "two.", "one."]


def test_an_upload_the_provider_refused_is_split_anew_on_the_rerun(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": [f"Row {i}." for i in range(40)]})
    with serve(time_scale=0.001, batch_completion_s=5, batch_max_file_bytes=3_000) as url:
        client = openai.OpenAI(base_url=url, api_key="x")

        def fn(max_bytes: int) -> Any:
            limits = BatchLimits(max_bytes=max_bytes, poll_s=0.005, poll_max_s=0.05)
            return chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                        batch_limits=limits)

        with pytest.raises(openai.BadRequestError, match="too large"):
            dfbatch.process(df, fn(1_000_000), checkpoint=tmp_path, progress=False)
        out = dfbatch.process(df, fn(3_000), checkpoint=tmp_path, progress=False)
        inputs = batch_inputs(client)
    assert len(inputs) >= 2 and sum(len(x) for x in inputs) == 40
    assert out["error"].null_count() == 40


def test_a_job_cancelled_at_the_provider_marks_its_rows_for_the_rerun(tmp_path: Path) -> None:
    from dfbatch.run import _batch_api

    df = pl.DataFrame({"text": ["one.", "two."]})
    with serve(time_scale=0.001, batch_completion_s=1e6) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        original = _batch_api._BatchRun._submit

        async def submit_then_cancel(self: Any, aclient: Any, entry: Any, **kw: Any) -> None:
            await original(self, aclient, entry, **kw)
            await aclient.batches.cancel(entry.job_id)  # as `dfbatch jobs cancel` would

        _batch_api._BatchRun._submit = submit_then_cancel  # type: ignore[method-assign]
        try:
            out = dfbatch.process(df, fn, checkpoint=tmp_path, progress=False)
        finally:
            _batch_api._BatchRun._submit = original  # type: ignore[method-assign]
        assert all(e.startswith("batch_cancelled") for e in out["error"])
        assert len(list(client.batches.list())) == 1


@pytest.mark.slow
def test_batch_demo_prints_the_price_comparison_and_enriches_the_rows(tmp_path: Path) -> None:
    from dfbatch.demo import run_batch_demo

    report = run_batch_demo(rows=24, out_dir=tmp_path, progress=False)
    text = str(report)
    assert "batch API: $" in text and "synchronous (saves $" in text
    assert (report.rows, report.rows_ok, report.jobs) == (24, 24, 1)
    result = pl.read_parquet(report.result_path)
    assert result.schema["output"] == pl.Struct(
        {"summary": pl.String, "keywords": pl.List(pl.String)})


def test_jobs_reach_on_event_as_batches_so_run_stats_add_up(tmp_path: Path) -> None:
    from dfbatch.events import BatchFinished, RunStarted, StatsAccumulator

    df = pl.DataFrame({"text": [f"Row {i}." for i in range(9)] + ["x <<poison>>"]})
    acc = StatsAccumulator()
    seen: list[Any] = []

    def on_event(ev: Any) -> None:
        seen.append(ev)
        acc.apply(ev)

    limits = BatchLimits(max_requests=4, poll_s=0.005, poll_max_s=0.05)
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=limits)
        dfbatch.process(df, fn, checkpoint=tmp_path, progress=False, on_event=on_event)
    stats = acc.snapshot()
    assert isinstance(seen[0], RunStarted) and seen[0].total_rows == 10
    assert sum(isinstance(e, BatchFinished) for e in seen) == 3  # 4 + 4 + 2 rows
    assert (stats.rows_done, stats.rows_ok, stats.rows_failed) == (10, 9, 1)
    assert stats.input_tokens > 0 and stats.output_tokens > 0


def test_lookups_of_lost_uploads_stop_at_older_files() -> None:
    import asyncio

    from dfbatch.llm.batch_api import find_file, find_job

    with serve(time_scale=0.001) as url:
        sync = openai.OpenAI(base_url=url, api_key="x")
        a = sync.files.create(file=("a.jsonl", jsonl([line(0, "x")])), purpose="batch")
        b = sync.files.create(file=("b.jsonl", jsonl([line(0, "y")])), purpose="batch")
        assert [f.filename for f in sync.files.list(order="asc")] == ["a.jsonl", "b.jsonl"]
        job = sync.batches.create(input_file_id=a.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        sync.batches.create(input_file_id=b.id, endpoint="/v1/chat/completions",
                            completion_window="24h")

        async def look(since: float) -> tuple[Any, Any]:
            client = openai.AsyncOpenAI(base_url=url, api_key="x")
            async with client:
                return (await find_file(client, "a.jsonl", since),
                        await find_job(client, a.id, since))

        found, got = asyncio.run(look(0.0))
        assert found == a.id and got.id == job.id
        later = time.time() + 10_000  # an intent journaled long after these: not ours
        assert asyncio.run(look(later)) == (None, None)
