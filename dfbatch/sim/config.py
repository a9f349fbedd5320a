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
from typing import Any, Literal

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

    Provider models (how a real provider or gateway enforces and reports its limits):

    ``limit_window_s``
        Simulated seconds of budget the limiter holds. In ``"bucket"`` mode the token buckets
        hold ``limit x limit_window_s / 60`` and refill continuously at ``limit / 60`` per
        second: 60 (default) is a full-minute bucket, 1.0 enforces a per-minute limit per
        second (as OpenAI may and Azure OpenAI does), so a client that bursts a minute's worth
        gets 429s. In ``"calendar"`` mode it is the length of the fixed window.
    ``limit_mode``
        ``"bucket"`` (token buckets, above) or ``"calendar"``: fixed windows of
        ``limit_window_s`` aligned on the simulated clock (``calendar_offset_s`` + simulated
        seconds since the server started); each window admits ``limit x limit_window_s / 60``
        and its counters reset at the boundary, as gateways (LiteLLM) count per wall minute.
    ``calendar_offset_s``
        What the simulated wall clock reads at server start, within the window (45 = the run
        starts 15 s before a minute boundary).
    ``headers``
        ``"openai"``: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` on every answer
        (limits per real minute, resets as durations such as ``6m0s`` / ``120ms``) and a 429
        with ``retry-after`` (whole seconds) and, if ``retry_after_ms``, ``retry-after-ms``.
        ``"none"``: no rate-limit headers at all, and a 429 with no hint (body included).
        ``"litellm"``: the LiteLLM proxy's per-key headers
        ``x-ratelimit-api_key-{limit,remaining}-{requests,tokens}`` (no reset) and a 429 whose
        only hint is ``llm_provider-retry-after`` = the window length in whole real seconds
        (``60`` for a calendar minute at ``time_scale=1``), whatever the true wait.
        ``"ietf"``: the IETF draft's ``RateLimit-Policy: "requests";q=<quota>;w=<window>``
        and ``RateLimit: "requests";r=<remaining>;t=<reset>`` (real seconds; requests only:
        the draft has no token unit), a 429 with ``retry-after`` (whole seconds) and a body
        with no wait in it, as a generic API gateway answers.
    ``retry_after_ms``
        Send ``retry-after-ms`` beside ``retry-after`` (``"openai"`` style only).
    ``outage``
        ``(start_s, duration_s)`` in simulated seconds since server start, or ``None``. While
        down, every request is answered per ``outage_kind``: ``"reset"`` aborts the TCP
        connection (the OpenAI SDK raises ``APIConnectionError``), ``"503"`` answers 503.
        Such requests are logged with ``down=True`` (``SimSnapshot.down_requests``).
    ``overload_rate``
        Probability that a request is refused with a 429 that is *not* a rate limit (OpenAI's
        "engine is currently overloaded", ``type: "server_error"``, ``code:
        "engine_overloaded"``, no retry hint); it is not charged to the limits. Drawn from its
        own seeded generator, so other draws are unchanged.
    ``strict_models``
        Unknown models (not in ``models``) get OpenAI's 404 ``model_not_found``.
    ``forbidden_models``
        Models the key may not use: 403 (``openai.PermissionDeniedError``).

    Batch API (``dfbatch.sim.batches``): a batch takes ``batch_completion_s`` simulated
    seconds; one whose completion window (``batch_window_s``, else its ``completion_window``)
    ends first expires with the lines done by then. Uploads over ``batch_max_file_bytes`` are
    refused; a file of more than ``batch_max_requests`` lines fails its batch.
    ``batch_enqueued_tokens`` (``None``: no limit) is a model's enqueued-token limit: a batch
    whose prompt tokens, with those of the model's batches not yet over, exceed it is created
    ``failed`` with error code ``token_limit_exceeded``, as OpenAI does.
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
    limit_window_s: float = 60.0
    limit_mode: Literal["bucket", "calendar"] = "bucket"
    calendar_offset_s: float = 0.0
    headers: Literal["openai", "none", "litellm", "ietf"] = "openai"
    retry_after_ms: bool = True
    outage: tuple[float, float] | None = None
    outage_kind: Literal["reset", "503"] = "reset"
    overload_rate: float = 0.0
    strict_models: bool = False
    forbidden_models: tuple[str, ...] = ()
    batch_completion_s: float = 600.0
    batch_window_s: float | None = None
    batch_max_requests: int = 50_000
    batch_max_file_bytes: int = 200_000_000
    batch_enqueued_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None:
                _non_negative(name, value, strict=True)
        for name in ("ttft_s", "per_input_token_s", "per_token_s", "embed_latency_s", "hang_s"):
            _non_negative(name, getattr(self, name))
        _non_negative("time_scale", self.time_scale, strict=True)
        for name in ("tail_prob", "error_rate", "hang_rate", "reset_rate", "overload_rate"):
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
        self._check_provider()
        _non_negative("batch_completion_s", self.batch_completion_s, strict=True)
        if self.batch_window_s is not None:
            _non_negative("batch_window_s", self.batch_window_s, strict=True)
        for name in ("batch_max_requests", "batch_max_file_bytes", "batch_enqueued_tokens"):
            value = getattr(self, name)
            if name == "batch_enqueued_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                msg = f"{name} must be an integer > 0, got {value!r}"
                raise ConfigError(msg)

    def _check_provider(self) -> None:
        _non_negative("limit_window_s", self.limit_window_s, strict=True)
        _non_negative("calendar_offset_s", self.calendar_offset_s)
        _one_of("limit_mode", self.limit_mode, ("bucket", "calendar"))
        _one_of("headers", self.headers, ("openai", "none", "litellm", "ietf"))
        _one_of("outage_kind", self.outage_kind, ("reset", "503"))
        if self.outage is not None:
            ok = isinstance(self.outage, tuple) and len(self.outage) == 2
            if not ok:
                msg = f"outage must be (start_s, duration_s) or None, got {self.outage!r}"
                raise ConfigError(msg)
            _non_negative("outage start_s", self.outage[0])
            _non_negative("outage duration_s", self.outage[1], strict=True)

    @property
    def window_s(self) -> float:
        """Real seconds in one simulated rate-limit minute."""
        return 60.0 * self.time_scale

    @property
    def limit_window_real_s(self) -> float:
        """Real seconds of the enforcement window (``limit_window_s x time_scale``)."""
        return self.limit_window_s * self.time_scale

    def is_down(self, sim_t: float) -> bool:
        """Whether simulated second ``sim_t`` (since server start) falls in the outage."""
        if self.outage is None:
            return False
        start, duration = self.outage
        return start <= sim_t < start + duration

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


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        msg = f"{name} must be one of {options}, got {value!r}"
        raise ConfigError(msg)
