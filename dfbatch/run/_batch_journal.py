"""The journal of a Batch API run: which files and jobs exist, and the answers collected.

One JSON file, rewritten atomically (temporary file + ``os.replace``) at every step that spends
money or learns an answer, so no crash, Ctrl-C or closed laptop loses a job or pays twice:

1. *intent*: the file's name and its rows (``custom_id`` s) are written before the upload,
2. the file id right after the upload (a rerun that finds an intent without it looks the file
   up by name on the provider before uploading again),
3. the job id right after ``batches.create`` (a rerun that finds a file id without a job looks
   for a job of that file on the provider before creating one),
4. the answers of every row when the job is over, and the job marked collected.

It lives in ``checkpoint=`` (``batch_api.json``) or, without one, in
``.dfbatch/batch_api/<fingerprint>.json`` under the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dfbatch.errors import ConfigError

_VERSION = 1
_NAME = "batch_api.json"


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

    def __init__(self, path: Path, run: str) -> None:
        self.path = path
        self.run = run
        self.files: list[FileEntry] = []
        self.answers: dict[str, Stored] = {}

    @classmethod
    def open(cls, checkpoint: str | os.PathLike[str] | None, fingerprint: Any,
             overwrite: bool = False) -> BatchJournal:
        run = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str)
                             .encode()).hexdigest()[:16]
        if checkpoint is not None:
            path = Path(checkpoint) / _NAME
        else:
            path = Path.cwd() / ".dfbatch" / "batch_api" / f"{run}.json"
        journal = cls(path, run)
        if path.exists() and not overwrite:
            journal._load()
        return journal

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
        self.answers = {k: Stored(**v) for k, v in data.get("answers", {}).items()}

    def save(self) -> None:
        """Write the journal atomically (never a half-written file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": _VERSION, "run": self.run, "files": [asdict(f) for f in self.files],
                "answers": {k: asdict(v) for k, v in self.answers.items()}}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".batch_api.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add_file(self, rows: list[str]) -> FileEntry:
        """Journal the intent to upload ``rows`` as a new file (saved before any upload)."""
        entry = FileEntry(f"dfbatch-{self.run}-{len(self.files)}.jsonl", rows)
        self.files.append(entry)
        self.save()
        return entry

    def live(self) -> list[FileEntry]:
        return [f for f in self.files if not f.collected]
