"""The Batch API, second part: answers without choices, custom ids, refused arguments, the
journal lock, ``dfbatch jobs collect``, the enqueued-token limit across jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import dfbatch
from dfbatch.errors import ConfigError, RowError
from dfbatch.llm import chat
from dfbatch.llm.batch_api import CUSTOM_ID_MAX, BatchLimits, read_results
from dfbatch.sim import serve

openai = pytest.importorskip("openai")
FAST = BatchLimits(poll_s=0.005, poll_max_s=0.05)


def batch_inputs(client: Any) -> list[list[dict[str, Any]]]:
    """The request lines of every batch created on the simulator, oldest first."""
    jobs = list(reversed(list(client.batches.list())))
    return [[json.loads(x) for x in client.files.content(j.input_file_id).text.splitlines()]
            for j in jobs]


# -- bugs --------------------------------------------------------------------------------------
def test_an_answer_without_choices_is_a_row_error_not_an_exception() -> None:
    adapter = chat("sim-chat", base_url="http://127.0.0.1:9/v1", api="batch").dfbatch_batch_api
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}}
    got = adapter.answer(body)  # raised IndexError before
    assert isinstance(got.value, RowError) and "no choices" in str(got.value)
    assert got.input_tokens == 7  # paid for: the usage still counts
    line = {"custom_id": "a", "response": {"status_code": 200, "body": body}}
    assert "no choices" in str(read_results(json.dumps(line), adapter)["a"].value)


def test_long_or_odd_key_values_make_custom_ids_the_provider_accepts(tmp_path: Path) -> None:
    urls = [f"https://example.com/{'deep/' * 12}page {i}?q=ä" for i in range(3)]
    df = pl.DataFrame({"url": urls, "text": ["one.", "two.", "three."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        out = dfbatch.process(df, fn, key="url", checkpoint=tmp_path, progress=False)
        again = dfbatch.process(df.reverse(), fn, key="url", checkpoint=tmp_path,
                                progress=False)
        inputs = batch_inputs(openai.OpenAI(base_url=url, api_key="x"))
    assert out["error"].to_list() == [None] * 3, out["error"].to_list()
    assert out["output"].to_list() == ["one.", "two.", "three."]
    assert len(inputs) == 1  # the reordered rerun found every row by its key
    assert again["output"].to_list() == ["three.", "two.", "one."]
    ids = [x["custom_id"] for x in inputs[0]]
    assert len(set(ids)) == 3 and all(len(c) <= CUSTOM_ID_MAX for c in ids)


def test_a_request_line_refuses_a_custom_id_over_the_limit() -> None:
    from dfbatch.llm.batch_api import custom_id, request_line

    assert request_line(custom_id("x" * 51, {}), "/v1/embeddings", {}).startswith(b'{"cus')
    assert custom_id("x" * 52, {}).startswith("k")  # too long with its hash: hashed
    with pytest.raises(ConfigError, match="more than the providers' limit of 64"):
        request_line("r" * 65, "/v1/embeddings", {})


def test_the_simulator_fails_a_batch_with_a_custom_id_over_the_limit() -> None:
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        body = {"model": "sim-chat", "messages": [{"role": "user", "content": "a"}]}
        line = {"custom_id": "r" * 65, "method": "POST", "url": "/v1/chat/completions",
                "body": body}
        f = client.files.create(file=("in.jsonl", (json.dumps(line) + "\n").encode()),
                                purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        b = client.batches.retrieve(b.id)
    assert b.status == "failed" and b.errors is not None
    assert b.errors.data[0].code == "invalid_custom_id"


@pytest.mark.parametrize(("argument", "value", "named"), [
    ("out", "o.parquet", "out='o.parquet'"), ("engine", "ray", "engine='ray'"),
    ("cache", True, "cache="), ("cache_key", ["text"], "cache_key=['text']"),
    ("cache_errors", True, "cache_errors=True"),
    ("ray_address", "ray://nowhere:1", "ray_address='ray://nowhere:1'"),
])
def test_arguments_a_batch_api_run_cannot_honour_are_refused_up_front(
    tmp_path: Path, argument: str, value: Any, named: str
) -> None:
    df = pl.DataFrame({"text": ["one."]})
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        with pytest.raises(ConfigError, match="drop") as caught:
            dfbatch.process(df, fn, checkpoint=tmp_path, progress=False, **{argument: value})
        client = openai.OpenAI(base_url=url, api_key="x")
        assert list(client.files.list()) == []  # nothing was sent
    assert named in str(caught.value)


# -- the journal lock --------------------------------------------------------------------------
_HOLDER = """
import sys, polars as pl, dfbatch
from dfbatch.llm import batch_api, chat
real_create = batch_api.create
async def create(*args, **kwargs):
    job = await real_create(*args, **kwargs)
    print("submitted", flush=True)  # the job exists; this process polls it, holding the lock
    return job
batch_api.create = create
df = pl.DataFrame({"text": [f"Row {i}." for i in range(6)]})
fn = chat("sim-chat", "{text}", max_tokens=8, base_url=sys.argv[1], api="batch",
          batch_limits=batch_api.BatchLimits(poll_s=0.01, poll_max_s=0.05))
out = dfbatch.process(df, fn, checkpoint=sys.argv[2], progress=False)
print("done", out["error"].null_count(), flush=True)
"""


def test_a_second_process_on_the_same_journal_is_refused_and_submits_nothing(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    from dfbatch.errors import CheckpointError

    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ckpt = tmp_path / "ckpt"
    df = pl.DataFrame({"text": [f"Row {i}." for i in range(6)]})
    with serve(time_scale=0.001, batch_completion_s=3_000) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        child = subprocess.Popen([sys.executable, str(script), url, str(ckpt)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "submitted"
            fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                      batch_limits=FAST)
            with pytest.raises(CheckpointError, match=r"journal\.lock") as caught:
                dfbatch.process(df, fn, checkpoint=ckpt, progress=False)
            assert f"process {child.pid}" in str(caught.value)
            assert len(list(client.batches.list())) == 1  # the second run sent nothing
            rest, err = child.communicate(timeout=120)
        finally:
            child.kill()
        assert child.returncode == 0, err
        assert rest.strip() == "done 6"
        out = dfbatch.process(df, fn, checkpoint=ckpt, progress=False)  # the lock is free
        assert len(list(client.batches.list())) == 1
    assert out["output"].to_list() == df["text"].to_list()


# -- dfbatch jobs collect ------------------------------------------------------------------------
def test_jobs_collect_writes_the_answers_and_puts_them_back_on_the_input_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from dfbatch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    texts = ["one.", "two.", "x <<poison>>", "four."]
    pl.DataFrame({"id": ["d", "c", "b", "a"], "text": texts}).write_parquet("in.parquet")
    runner = CliRunner()
    with serve(time_scale=0.001, batch_completion_s=5) as url:
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=FAST)
        df = pl.read_parquet("in.parquet")
        dfbatch.process(df, fn, checkpoint=tmp_path / "by_row", progress=False)
        dfbatch.process(df, fn, key="id", checkpoint=tmp_path / "by_key", progress=False)
        by_row, by_key = [j.id for j in reversed(list(
            openai.OpenAI(base_url=url, api_key="x").batches.list()))]
        jobs = ["jobs", "--base-url", url, "collect"]
        r = runner.invoke(main, [*jobs, by_row, "--out", "answers.parquet"])
        assert r.exit_code == 0, r.output
        assert "wrote 4 rows" in r.output and "3 answered, 1 with an error" in r.output
        answers = pl.read_parquet("answers.parquet").sort("row")
        assert answers["row"].to_list() == ["0", "1", "2", "3"]
        assert answers["output"].to_list() == ["one.", "two.", None, "four."]
        assert "HTTP 400" in answers["error"][2]
        assert answers["input_tokens"].to_list()[:2] == [9, 9]  # the usage of the answers
        r = runner.invoke(main, [*jobs, by_row, "--data", "in.parquet", "--out", "rows.csv"])
        assert r.exit_code == 0, r.output
        rows = pl.read_csv("rows.csv")
        assert rows["text"].to_list() == texts  # the input's rows, in its order
        assert rows["output"].to_list() == ["one.", "two.", None, "four."]
        pl.read_parquet("in.parquet").reverse().write_parquet("shuffled.parquet")
        r = runner.invoke(main, [*jobs, by_key, "--data", "shuffled.parquet", "--key", "id",
                                 "--out", "keyed.parquet"])
        assert r.exit_code == 0, r.output
        keyed = pl.read_parquet("keyed.parquet")
        assert keyed["output"].to_list() == ["four.", None, "two.", "one."]
        r = runner.invoke(main, [*jobs, by_row, "--data", "shuffled.parquet", "--key", "nope",
                                 "--out", "x.parquet"])
        assert r.exit_code == 2 and "--key 'nope'" in r.output
        r = runner.invoke(main, [*jobs, by_row, "--out", "raw.jsonl"])  # the raw lines
        assert r.exit_code == 0 and "wrote 4 lines" in r.output


# -- the enqueued-token limit across jobs ----------------------------------------------------------
def _failed_over_limit(client: Any) -> int:
    return sum(1 for b in client.batches.list() if b.status == "failed"
               and any(e.code == "token_limit_exceeded" for e in b.errors.data))


def test_the_simulator_fails_a_batch_over_the_enqueued_token_limit() -> None:
    from tests.test_batch_api import jsonl, line

    with serve(time_scale=0.001, batch_completion_s=1e6, batch_enqueued_tokens=20) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        jobs = []
        for k in range(2):  # 16 prompt tokens each: the second one is over the limit
            f = client.files.create(file=("in.jsonl", jsonl([line(k, "Summarize: a b c d.")])),
                                    purpose="batch")
            jobs.append(client.batches.create(input_file_id=f.id, completion_window="24h",
                                              endpoint="/v1/chat/completions"))
        first, second = (client.batches.retrieve(j.id) for j in jobs)
    assert first.status in ("validating", "in_progress")
    assert second.status == "failed" and second.errors.data[0].code == "token_limit_exceeded"


def test_jobs_in_flight_stay_within_the_enqueued_token_limit(tmp_path: Path) -> None:
    df = pl.DataFrame({"text": [f"Row number {i} of the table." for i in range(60)]})
    limit = 450  # room for two files of ten rows at once (each ~180 prompt tokens)
    with serve(time_scale=0.001, batch_completion_s=300, batch_enqueued_tokens=limit) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        unlimited = BatchLimits(max_requests=10, poll_s=0.005, poll_max_s=0.05)
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=unlimited)
        before = dfbatch.process(df, fn, checkpoint=tmp_path / "a", progress=False)
        refused = _failed_over_limit(client)
        assert refused > 0  # all six files at once: the provider refuses some, and
        assert before["error"].null_count() == 60  # they went again as earlier jobs ended
        limited = BatchLimits(max_requests=10, max_enqueued_tokens=limit, poll_s=0.005,
                              poll_max_s=0.05)
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=limited)
        seen = len(list(client.batches.list()))
        out = dfbatch.process(df, fn, checkpoint=tmp_path / "b", progress=False)
        every = list(client.batches.list())  # newest first
        jobs = every[: len(every) - seen]
        assert _failed_over_limit(client) == refused  # none of the second run's was refused
    assert len(jobs) == 6 and all(j.status == "completed" for j in jobs)
    assert out["error"].null_count() == 60
    assert out["output"].to_list() == df["text"].to_list()


def test_a_refused_file_goes_again_when_every_job_ended_in_the_same_poll(tmp_path: Path) -> None:
    """Jobs that all end between two polls: a file the queue refused goes again even when
    the jobs that filled the queue were seen ending first (nothing of the run is live then)."""
    df = pl.DataFrame({"text": [f"Row number {i} of the table." for i in range(60)]})
    with serve(time_scale=0.001, batch_completion_s=300, batch_enqueued_tokens=450) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        slow_polls = BatchLimits(max_requests=10, poll_s=1.0, poll_max_s=1.0)
        fn = chat("sim-chat", "{text}", max_tokens=8, base_url=url, api="batch",
                  batch_limits=slow_polls)
        out = dfbatch.process(df, fn, checkpoint=tmp_path / "a", progress=False)
        assert _failed_over_limit(client) > 0
    assert out["error"].null_count() == 60
    assert out["output"].to_list() == df["text"].to_list()


def test_no_file_is_bigger_than_the_enqueued_token_limit() -> None:
    import numpy as np

    from dfbatch.llm.batch_api import split_files

    limits = BatchLimits(max_tokens=1_000, max_enqueued_tokens=250)
    parts = split_files(np.full(10, 10), limits, np.full(10, 100))
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    with pytest.raises(ConfigError, match="max_enqueued_tokens"):
        BatchLimits(max_enqueued_tokens=0)


def test_cli_run_enqueued_tokens_sends_one_job_at_a_time_within_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from dfbatch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pl.DataFrame({"text": ["The first row.", "The second row."]}).write_parquet("in.parquet")
    runner = CliRunner()
    args = ["run", "in.parquet", "--model", "sim-chat", "--out", "out.parquet",
            "--no-progress", "--max-tokens", "8"]
    r = runner.invoke(main, [*args, "--enqueued-tokens", "20"])
    assert r.exit_code == 2 and "add --batch-api" in r.output
    with serve(time_scale=0.001, batch_completion_s=5, batch_enqueued_tokens=20) as url:
        r = runner.invoke(main, [*args, "--base-url", url, "--batch-api",
                                 "--enqueued-tokens", "20"])
        assert r.exit_code == 0, r.output
        jobs = list(openai.OpenAI(base_url=url, api_key="x").batches.list())
    assert [j.status for j in jobs] == ["completed", "completed"]  # one row per file
    assert pl.read_parquet("out.parquet")["output"].to_list() == ["The first row.",
                                                                  "The second row."]


def test_the_cli_batch_demo_prints_its_report(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dfbatch.cli import main

    r = CliRunner().invoke(main, ["demo", "--batch-api", "--rows", "12", "--out-dir",
                                  str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output  # raised AttributeError (rows_cancelled) before
    assert "dfbatch demo (Batch API, simulator): 12 rows in 1 job(s): ok 12" in r.output
