"""Pytest fixtures for the local simulated endpoint (``dfbatch.sim``).

Shared by every test module (pytest loads this conftest automatically):

- ``make_sim(**config)``: start a simulator (in a background thread) and return the
  ``SimServer``; ``server.url`` is its base URL, ``server.stats`` what it served. Stopped after
  the test. Defaults for tests: ``time_scale=0.01`` (a 0.25 s latency takes 2.5 ms), no tail.
- ``sim``: one such server with the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dfbatch.sim import SimServer, serve

TEST_DEFAULTS: dict[str, Any] = {"time_scale": 0.01, "tail_prob": 0.0, "rpm": None, "tpm": None}


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimServer]]:
    started: list[SimServer] = []

    def make(**config: Any) -> SimServer:
        server = serve(**{**TEST_DEFAULTS, **config})
        server.__enter__()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.__exit__(None, None, None)


@pytest.fixture
def sim(make_sim: Callable[..., SimServer]) -> SimServer:
    return make_sim()
