"""Fault-injecting fake APIs shared by the pool tests (deterministic, seeded)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import polars as pl

from dfbatch.errors import FatalError, RetryableError
from dfbatch.events import RunStats
from dfbatch.limits import per_request


@dataclass
class FakeAPI:
    """An async fn with seeded latency, retryable faults with retry_after, hangs and poison rows.

    ``poison`` rows (text contains "POISON") make the whole call fail with a non-retryable error.
    Records every call (texts, start, end, outcome) and the peak number of calls in flight.
    """

    seed: int = 0
    latency: float = 0.002
    p_retryable: float = 0.0
    retry_after: float = 0.01
    p_hang: float = 0.0
    hang_s: float = 30.0
    calls: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def __call__(self, batch: pl.DataFrame) -> list[str]:
        texts = batch["text"].to_list()
        call = {"texts": texts, "start": time.monotonic(), "outcome": "cancelled"}
        self.calls.append(call)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        roll = self.rng.random()
        try:
            await asyncio.sleep(self.latency * (0.5 + self.rng.random()))
            if any("POISON" in t for t in texts):
                call["outcome"] = "poison"
                msg = "400: invalid input"
                raise FatalError(msg)
            if roll < self.p_retryable:
                call["outcome"] = "retry"
                msg = "429: rate limited"
                raise RetryableError(msg, retry_after=self.retry_after)
            if roll < self.p_retryable + self.p_hang:
                call["outcome"] = "hang"
                await asyncio.sleep(self.hang_s)
            call["outcome"] = "ok"
            return [expected(t) for t in texts]
        finally:
            call["end"] = time.monotonic()
            self.in_flight -= 1


def expected(text: str) -> str:
    return text[::-1].upper()


def texts(n: int, poison_every: int = 0) -> pl.DataFrame:
    rows = [f"row {i} " + "word " * (i % 7) for i in range(n)]
    if poison_every:
        rows = [r + " POISON" if i % poison_every == poison_every - 1 else r
                for i, r in enumerate(rows)]
    return pl.DataFrame({"id": range(n), "text": rows})


def pid_per_row(batch: pl.DataFrame) -> list[int]:
    """A module-level (picklable) plain fn: the id of the process that ran each row."""
    import os

    return [os.getpid()] * batch.height


def dies_always(batch: pl.DataFrame) -> list[int]:
    """A module-level plain fn whose worker process dies on every call."""
    import os

    os._exit(1)


def dies_on_row_5(batch: pl.DataFrame) -> list[int]:
    """A module-level plain fn whose worker process dies on the row with id 5."""
    import os

    if 5 in batch["id"].to_list():
        os._exit(1)
    return (batch["id"] * 2).to_list()


class RecordingView:
    """A live view (``open_display``'s result) that keeps every ``RunStats`` it is shown."""

    def __init__(self) -> None:
        self.shown: list[RunStats] = []

    def update(self, stats: RunStats) -> None:
        self.shown.append(stats)

    def close(self, stats: RunStats) -> None:
        self.shown.append(stats)


def hangs_on_row_0(batch: pl.DataFrame) -> list[int]:
    """A module-level plain fn: the row with id 0 hangs (60 s), the others take 0.2 s. Each
    call leaves its process id in the folder ``$DFBATCH_TEST_PIDS`` (if set) as it starts."""
    import os

    folder = os.environ.get("DFBATCH_TEST_PIDS")
    if folder:
        with open(os.path.join(folder, str(os.getpid())), "w"):
            pass
    time.sleep(60.0 if 0 in batch["id"].to_list() else 0.2)
    return batch["id"].to_list()


def sleeps_then_pid(batch: pl.DataFrame) -> list[int]:
    """A module-level plain fn: sleeps the first row's ``sleep`` seconds, then answers the id
    of its process for each row."""
    import os

    time.sleep(batch["sleep"][0])
    return [os.getpid()] * batch.height


async def _stamped_request() -> float:
    import time

    import dfbatch.limits

    async with dfbatch.limits.request(tokens=1):
        return time.monotonic()


@per_request
def requests_per_row(batch: pl.DataFrame) -> list[float]:
    """A sync fn that sends one request per row, each charged with dfbatch.limits.request
    (in its own event loop); returns when each was sent (CLOCK_MONOTONIC: one machine)."""
    return [asyncio.run(_stamped_request()) for _ in range(batch.height)]
