"""The journal of a Batch API run: which files and jobs exist, and the answers collected.

A folder: ``journal.json`` (the files and jobs, small) rewritten atomically (temporary file +
``os.replace``) at every step that spends money, and one ``answers-<k>.json`` per collected
job (written atomically before the job is marked collected; a crash in between only makes the
rerun download that job's files again), so no crash, Ctrl-C or closed laptop loses a job or
pays twice:

1. *intent*: the file's name and its rows (``custom_id`` s) are written before the upload,
2. the file id right after the upload (a rerun that finds an intent without it looks the file
   up by name on the provider before uploading again),
3. the job id right after ``batches.create`` (a rerun that finds a file id without a job looks
   for a job of that file on the provider before creating one),
4. the answers of every row when the job is over, and the job marked collected.

It lives in ``checkpoint=`` (``batch_api/``) or, without one, in
``.dfbatch/batch_api/<fingerprint>/`` under the working directory. The run that opens it holds
an OS lock (``flock``) on ``journal.lock`` beside it until it ends: a second process resuming
the same journal at once is refused (``CheckpointError`` naming the lock file and its holder)
instead of submitting the same rows again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfbatch.errors import ConfigError
from dfbatch.persist._lock import hold

_VERSION = 1
_NAME = "batch_api"
_MAIN = "journal.json"
_LOCK = "journal.lock"


@dataclass
class FileEntry:
    """One input file and its job, as far as it got."""

    name: str
    rows: list[str]  # custom ids, in file order
    file_id: str | None = None
    job_id: str | None = None
    status: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    created_at: float | None = None
    finished_at: float | None = None
    collected: bool = False
    intent_at: float = 0.0  # epoch seconds: no upload or job of this file is older
    tokens: int = 0  # request tokens (prompt + output cap), for the enqueued-token limit


@dataclass
class Stored:
    """One row's answer: value or error; ``resumable`` rows (expired, cancelled, never
    answered) are submitted again by the next run."""

    value: Any = None
    error: str | None = None
    resumable: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    file: int = -1


class BatchJournal:
    """Load / save the JSON journal of one Batch API run."""

    def __init__(self, folder: Path, run: str) -> None:
        self.folder = folder
        self.path = folder / _MAIN
        self.run = run
        self.files: list[FileEntry] = []
        self.answers: dict[str, Stored] = {}
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, checkpoint: str | os.PathLike[str] | None, fingerprint: Any,
             overwrite: bool = False) -> BatchJournal:
        run = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str)
                             .encode()).hexdigest()[:16]
        if checkpoint is not None:
            path = Path(checkpoint) / _NAME
        else:
            path = Path.cwd() / ".dfbatch" / "batch_api" / run
        journal = cls(path, run)
        journal._lock()
        try:
            if journal.path.exists() and not overwrite:
                journal._load()
        except BaseException:
            journal.close()
            raise
        return journal

    def _lock(self) -> None:
        """Hold ``journal.lock`` (``flock``, released by ``close`` or the process's end)."""
        self._lock_fd = hold(self.folder / _LOCK,
                             f"the Batch API journal {str(self.folder)!r}",
                             "wait for it to end (or stop it), or use another checkpoint=")

    def close(self) -> None:
        """Release the lock (closing the descriptor releases the ``flock``)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except ValueError as e:
            msg = (f"the Batch API journal {self.path} is damaged ({e}); move it away to start "
                   "over (its jobs may still be running on the provider: dfbatch jobs list)")
            raise ConfigError(msg) from None
        if data.get("run") != self.run:
            msg = (f"the Batch API journal {self.path} belongs to another run (other model, "
                   "prompt or settings); use another checkpoint= or resume='overwrite'")
            raise ConfigError(msg)
        self.files = [FileEntry(**f) for f in data.get("files", [])]
        for k, entry in enumerate(self.files):
            if entry.collected and entry.status != "abandoned":
                rows = json.loads((self.folder / f"answers-{k}.json").read_text())
                for cid, value, error, resumable, n_in, n_out in rows:
                    self.answers[cid] = Stored(value, error, resumable, n_in, n_out, k)

    def save(self) -> None:
        """Write the files and jobs atomically (never a half-written journal)."""
        data = {"version": _VERSION, "run": self.run, "files": [vars(f) for f in self.files]}
        self._write(self.path, data)

    def collected(self, entry: FileEntry, answers: dict[str, Stored]) -> None:
        """Keep a finished job's answers, then mark it collected."""
        k = self.files.index(entry)
        rows = [[cid, a.value, a.error, a.resumable, a.input_tokens, a.output_tokens]
                for cid, a in answers.items()]
        self._write(self.folder / f"answers-{k}.json", rows)
        self.answers.update(answers)
        entry.collected = True
        self.save()

    def _write(self, path: Path, data: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(data, separators=(",", ":")))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add_file(self, rows: list[str], tokens: int = 0) -> FileEntry:
        """Journal the intent to upload ``rows`` as a new file (saved before any upload)."""
        entry = FileEntry(f"dfbatch-{self.run}-{len(self.files)}.jsonl", rows,
                          intent_at=time.time(), tokens=tokens)
        self.files.append(entry)
        self.save()
        return entry

    def live(self) -> list[FileEntry]:
        return [f for f in self.files if not f.collected]
