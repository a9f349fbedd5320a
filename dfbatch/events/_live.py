"""What a pool keeps of its calls for a live view (``StatsAccumulator.watch``): the calls in
flight, and the answered calls' fields not folded yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PENDING = 1024  # answered calls kept before they are folded (``StatsAccumulator.pending``)


class Used(Protocol):
    """The tokens a call reported (``execute._usage.Usage``)."""

    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class Tokens:
    """Tokens of a call told by its fields (an event's)."""

    input_tokens: int = 0
    output_tokens: int = 0


NOTHING_USED = Tokens()
# an answered call, as the pool tells it: (t, agent_id, planned_agent, rows, tokens, elapsed_s,
# error_rows, used)
Answer = tuple[float, int, int, int, int, float, int, Used]


class LiveCalls:
    """A pool's calls, kept by the pool: ``calls`` in flight (batch id -> (start, agent,
    tokens), in the order they started) and the fields of those ``answered`` (the
    accumulator's ``pending``, once it ``watch``es them), read by ``StatsAccumulator``."""

    __slots__ = ("answered", "calls")

    def __init__(self) -> None:
        self.calls: dict[int, tuple[float, int, int]] = {}
        self.answered: list[Answer] = []

    def __repr__(self) -> str:
        return f"LiveCalls(in_flight={len(self.calls)}, answered={len(self.answered)})"
