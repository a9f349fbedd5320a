"""Where the pool runs: ``engine="asyncio"`` (this process) or ``engine="ray"`` (a Ray cluster).

Both engines take the same plan, the same pool and return the same result frame; an engine
only chooses the *caller* that runs each batch (``dfbatch.execute._caller.LOCAL``, or
``dfbatch.engines.ray.RayEngine``) and may fill in settings the cluster decides (agents and the
in-flight cap scale with the cluster's CPUs). This is the one place an engine is chosen; Ray
is imported only when ``engine="ray"`` is asked for.

Examples
--------
>>> from dfbatch import BatchConfig
>>> from dfbatch.engines import select
>>> chosen, cfg = select("asyncio", BatchConfig(), None)
>>> type(chosen).__name__
'Local'
>>> select("dask", BatchConfig(), None)
Traceback (most recent call last):
...
dfbatch.errors.ConfigError: engine must be 'asyncio' or 'ray', got 'dask'
"""

from __future__ import annotations

from typing import Literal

from dfbatch.config import BatchConfig
from dfbatch.errors import ConfigError
from dfbatch.execute._caller import LOCAL, CallerFactory

Engine = Literal["asyncio", "ray"]
ENGINES = ("asyncio", "ray")
RAY_EXTRA = "pip install 'dfbatch[ray]'"


def select(
    engine: str, cfg: BatchConfig, ray_address: str | None
) -> tuple[CallerFactory, BatchConfig]:
    """The callers' maker for ``engine`` and the config it runs with.

    ``engine="ray"`` connects to Ray first (see ``dfbatch.engines.ray.connect``).
    """
    if engine == "asyncio":
        if ray_address is not None:
            msg = f"ray_address={ray_address!r} needs engine='ray'; pass engine='ray' too"
            raise ConfigError(msg)
        return LOCAL, cfg
    if engine == "ray":
        ray_engine = load_ray()
        return ray_engine.RayEngine(), ray_engine.configure(cfg, ray_address)
    msg = f"engine must be 'asyncio' or 'ray', got {engine!r}"
    raise ConfigError(msg)


def asyncio_only(engine: str, feature: str) -> None:
    """Refuse ``feature`` (e.g. ``out=``) under an engine that does not support it yet."""
    if engine != "asyncio":
        msg = f"{feature} runs on engine='asyncio' only for now, got engine={engine!r}"
        raise ConfigError(msg)


def load_ray():  # type: ignore[no-untyped-def]
    """Import the Ray engine, or say how to install it."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        msg = f"engine='ray' needs Ray: {RAY_EXTRA}"
        raise ImportError(msg) from exc
    from dfbatch.engines import ray as ray_engine

    return ray_engine
