"""``SimConfig``: every knob of the simulated endpoint (latency, limits, faults, content).

All durations are *simulated* seconds; ``time_scale`` maps them to real seconds. With
``time_scale=0.01`` a 0.5 s latency takes 5 ms and the rate-limit "minute" lasts 0.6 s, so the
limits a client must respect in real time are ``rpm / time_scale`` per minute (see
``real_rpm`` / ``real_tpm``).

Examples
--------
>>> from dfbatch.sim import SimConfig
>>> cfg = SimConfig(rpm=600, tpm=100_000, time_scale=0.1)
>>> cfg.window_s, cfg.real_rpm, cfg.real_tpm
(6.0, 6000.0, 1000000.0)
>>> SimConfig(error_rate=1.5)
Traceback (most recent call last):
...
dfbatch.errors.ConfigError: error_rate must be a probability in [0, 1], got 1.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dfbatch.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class SimConfig:
    """Settings of the simulated OpenAI-compatible endpoint.

    Limits: ``rpm`` / ``tpm`` (requests / tokens per simulated minute, ``None`` = unlimited).
    A chat request is charged its prompt tokens plus ``max_tokens`` (as OpenAI does), an
    embeddings request its input tokens. Both are token buckets that start full.

    Latency: ``ttft_s`` (time to first token) + ``per_input_token_s`` x prompt tokens +
    ``per_token_s`` x completion tokens; with probability ``tail_prob`` that is multiplied by a
    heavy-tailed (Pareto, alpha 1.5) factor of at least ``tail_factor``, capped at
    ``tail_cap``. ``embed_latency_s`` is the base latency of an embeddings request.

    Faults (drawn per request, after the rate limiter admitted it): ``error_rate`` -> HTTP 500,
    ``hang_rate`` -> no answer for ``hang_s``, ``reset_rate`` -> the TCP connection is reset.
    An input containing ``poison_marker`` always gets HTTP 400; in a batch-mode request
    (a JSON list of ``{"id", "input"}`` items) an item containing ``drop_marker`` is left out
    of the answer, so the client cannot map it back.

    Content: deterministic for a given input (extractive summary, keyword list, JSON matching
    a ``json_schema`` response format, hashed pseudo-embeddings of ``embedding_dimensions``).
    ``seed`` seeds latency and fault draws. ``api_key``: when set, requests must carry it.
    """

    rpm: float | None = 600.0
    tpm: float | None = 200_000.0
    ttft_s: float = 0.25
    per_input_token_s: float = 0.0
    per_token_s: float = 0.01
    embed_latency_s: float = 0.05
    tail_prob: float = 0.02
    tail_factor: float = 4.0
    tail_cap: float = 50.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 600.0
    reset_rate: float = 0.0
    poison_marker: str = "<<poison>>"
    drop_marker: str = "<<drop>>"
    time_scale: float = 1.0
    seed: int = 0
    embedding_dimensions: int = 256
    default_max_tokens: int = 256
    api_key: str | None = None
    models: tuple[str, ...] = ("sim-chat", "sim-embed")

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None:
                _non_negative(name, value, strict=True)
        for name in ("ttft_s", "per_input_token_s", "per_token_s", "embed_latency_s", "hang_s"):
            _non_negative(name, getattr(self, name))
        _non_negative("time_scale", self.time_scale, strict=True)
        for name in ("tail_prob", "error_rate", "hang_rate", "reset_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                msg = f"{name} must be a probability in [0, 1], got {value!r}"
                raise ConfigError(msg)
        if self.error_rate + self.hang_rate + self.reset_rate > 1:
            msg = "error_rate + hang_rate + reset_rate must be <= 1"
            raise ConfigError(msg)
        if self.tail_factor < 1 or self.tail_cap < self.tail_factor:
            msg = f"need 1 <= tail_factor <= tail_cap, got {self.tail_factor}, {self.tail_cap}"
            raise ConfigError(msg)
        for name in ("embedding_dimensions", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"{name} must be an integer > 0, got {value!r}"
                raise ConfigError(msg)

    @property
    def window_s(self) -> float:
        """Real seconds in one simulated rate-limit minute."""
        return 60.0 * self.time_scale

    @property
    def real_rpm(self) -> float | None:
        """Requests per *real* minute the endpoint allows (``rpm / time_scale``)."""
        return None if self.rpm is None else self.rpm / self.time_scale

    @property
    def real_tpm(self) -> float | None:
        """Tokens per *real* minute the endpoint allows (``tpm / time_scale``)."""
        return None if self.tpm is None else self.tpm / self.time_scale

    @classmethod
    def from_kwargs(cls, config: SimConfig | None = None, /, **kwargs: Any) -> SimConfig:
        """``config`` (or the defaults) with ``kwargs`` replaced; unknown names are an error.

        >>> SimConfig.from_kwargs(rmp=10)
        Traceback (most recent call last):
        ...
        dfbatch.errors.ConfigError: unknown simulator setting 'rmp'. Hint: did you mean 'rpm'?
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in known:
                msg = f"unknown simulator setting {key!r}.{did_you_mean(key, known)}"
                raise ConfigError(msg)
        base = config if config is not None else cls()
        return dataclasses.replace(base, **kwargs) if kwargs else base


def _non_negative(name: str, value: object, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok:
        ok = value > 0 if strict else value >= 0  # type: ignore[operator]
    if not ok or value == float("inf"):
        bound = "> 0" if strict else ">= 0"
        msg = f"{name} must be a finite number {bound}, got {value!r}"
        raise ConfigError(msg)
