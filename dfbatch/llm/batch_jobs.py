"""Batch API jobs outside a run (``dfbatch jobs``): list them, and read one job's answers back
as a frame, on its own or put back on the rows of the input it was made from.

A job's output and error lines carry ``custom_id`` = ``<row>-<hash of the request>`` (see
``dfbatch.llm.batch_api.custom_id``): ``<row>`` is the row's position in the input frame, or
its ``key=`` value (hashed when long or odd). ``answers_frame`` reads every line into one row
``custom_id, row, output, error, input_tokens, output_tokens`` without knowing the adapter
(chat answers as their text, embeddings as their vector, anything else as its JSON);
``on_rows`` joins those answers back onto the input frame by position or by key.

Examples
--------
>>> import json
>>> from dfbatch.llm.batch_jobs import answers_frame
>>> ok = {"custom_id": "1-ab", "response": {"status_code": 200, "body": {
...     "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
...     "usage": {"prompt_tokens": 9, "completion_tokens": 1}}}}
>>> bad = {"custom_id": "0-cd", "response": {"status_code": 400, "body": {
...     "error": {"message": "no"}}}}
>>> frame = answers_frame("\\n".join(json.dumps(x) for x in (ok, bad)).encode())
>>> frame.select("row", "output", "error", "input_tokens").rows()
[('1', 'hi', None, 9), ('0', None, 'HTTP 400: no', 0)]
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from dfbatch.errors import ConfigError
from dfbatch.llm.batch_api import row_name


def job_rows(client: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The provider's batch jobs, newest first, as plain rows (synchronous ``openai.OpenAI``)."""
    rows = []
    for job in client.batches.list(limit=min(limit, 100)):
        counts = job.request_counts
        rows.append({
            "id": job.id, "status": job.status, "endpoint": job.endpoint,
            "total": counts.total if counts else None,
            "completed": counts.completed if counts else None,
            "failed": counts.failed if counts else None,
            "created_at": job.created_at,
            "dfbatch": (job.metadata or {}).get("dfbatch"),
        })
        if len(rows) >= limit:
            break
    return rows


def collect_job(client: Any, job_id: str) -> tuple[Any, bytes]:
    """A job and the lines of its output and error files (JSONL bytes, outputs first)."""
    job = client.batches.retrieve(job_id)
    data = b""
    for file_id in (job.output_file_id, job.error_file_id):
        if file_id:
            data += client.files.content(file_id).content
    return job, data


def answers_frame(data: bytes) -> pl.DataFrame:
    """One row per output / error line: ``custom_id``, ``row`` (its row part), ``output``
    (text, a vector, or JSON), ``error`` (None when answered), ``input_tokens``,
    ``output_tokens``. Lines that are not JSON or have no ``custom_id`` are skipped."""
    records = []
    for raw in data.decode("utf-8", "replace").splitlines():
        try:
            line = json.loads(raw)
            cid = str(line["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
        output, error, usage = _read(line)
        records.append({"custom_id": cid, "row": cid.rpartition("-")[0] or cid,
                        "output": output, "error": error,
                        "input_tokens": int(usage.get("prompt_tokens") or 0),
                        "output_tokens": int(usage.get("completion_tokens") or 0)})
    frame = pl.DataFrame(records, schema_overrides={"input_tokens": pl.Int64,
                                                    "output_tokens": pl.Int64},
                         strict=False, infer_schema_length=None)
    if frame.is_empty():
        return pl.DataFrame(schema={"custom_id": pl.String, "row": pl.String,
                                    "output": pl.String, "error": pl.String,
                                    "input_tokens": pl.Int64, "output_tokens": pl.Int64})
    return frame


def _read(line: dict[str, Any]) -> tuple[Any, str | None, dict[str, Any]]:
    """(output, error, usage) of one line, whatever its endpoint."""
    response = _dict(line.get("response"))
    body = _dict(response.get("body"))
    usage = _dict(body.get("usage"))
    error = line.get("error")
    if isinstance(error, dict):
        return None, f"batch error {error.get('code')}: {error.get('message')}", usage
    if response.get("status_code") != 200:
        detail = _dict(body.get("error"))
        return None, f"HTTP {response.get('status_code')}: {detail.get('message')}", usage
    choices = body.get("choices")
    if isinstance(choices, list):
        message = (choices[0] or {}).get("message") if choices else None
        content = message.get("content") if isinstance(message, dict) else None
        if content is None:
            return None, "the answer has no content", usage
        return content, None, usage
    data = body.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0].get("embedding"), None, usage
    return json.dumps(body, ensure_ascii=False), None, usage


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def on_rows(data: pl.DataFrame, answers: pl.DataFrame, job_id: str,
            key: str | None = None) -> pl.DataFrame:
    """``data`` (the input the job was made from) with ``output`` and ``error`` added from
    ``answers`` (``answers_frame``), matched by row position, or by the ``key`` column when the
    run used ``key=``. Rows the job holds no answer for get ``error = "no answer in job ..."``.

    >>> data = pl.DataFrame({"text": ["a", "b", "c"]})
    >>> answers = pl.DataFrame({"custom_id": ["2-x", "0-y"], "row": ["2", "0"],
    ...                         "output": ["C", "A"], "error": [None, None]})
    >>> on_rows(data, answers, "batch_1")["output"].to_list()
    ['A', None, 'C']
    """
    for name in ("output", "error"):
        if name in data.columns:
            msg = (f"the input already has a column {name!r}, which the collected answers "
                   "add: drop or rename it first")
            raise ConfigError(msg)
    if key is not None and key not in data.columns:
        msg = f"--key {key!r} is not a column of the input; name the id column the run used"
        raise ConfigError(msg)
    names = (pl.int_range(pl.len(), dtype=pl.Int64).cast(pl.String) if key is None
             else pl.col(key).cast(pl.String).map_elements(row_name, return_dtype=pl.String))
    joined = (data.with_columns(names.alias("__dfbatch_row"))
              .join(answers.select(pl.col("row").alias("__dfbatch_row"), "output", "error"),
                    on="__dfbatch_row", how="left", maintain_order="left")
              .drop("__dfbatch_row"))
    missing = pl.col("output").is_null() & pl.col("error").is_null()
    why = f"no answer in job {job_id} for this row (another job's, or not run)"
    return joined.with_columns(pl.when(missing).then(pl.lit(why)).otherwise(pl.col("error"))
                               .alias("error"))
