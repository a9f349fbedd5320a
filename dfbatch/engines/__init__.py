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

from collections.abc import Callable
from typing import Any, Literal

from dfbatch.config import BatchConfig
from dfbatch.errors import ConfigError
from dfbatch.execute._attempt import is_async
from dfbatch.execute._caller import LOCAL, CallerFactory, _check_pickles

Engine = Literal["asyncio", "ray"]
ENGINES = ("asyncio", "ray")
RAY_EXTRA = "pip install 'dfbatch[ray]'"


def select(
    engine: str, cfg: BatchConfig, ray_address: str | None,
    fn: Callable[..., Any] | None = None,
) -> tuple[CallerFactory, BatchConfig]:
    """The callers' maker for ``engine`` and the config it runs with.

    ``engine="ray"`` checks that the actors can run ``fn`` (``check_ray_fn``), then connects
    to Ray (see ``dfbatch.engines.ray.connect``).
    """
    if engine == "asyncio":
        if ray_address is not None:
            msg = f"ray_address={ray_address!r} needs engine='ray'; pass engine='ray' too"
            raise ConfigError(msg)
        return LOCAL, cfg
    if engine == "ray":
        if fn is not None:
            check_ray_fn(fn, cfg)
        ray_engine = load_ray()
        return ray_engine.RayEngine(), ray_engine.configure(cfg, ray_address)
    msg = f"engine must be 'asyncio' or 'ray', got {engine!r}"
    raise ConfigError(msg)


def check_ray_fn(fn: Callable[..., Any], cfg: BatchConfig) -> None:
    """Before Ray starts: under ``executor="process"`` each actor sends a plain ``fn`` on to
    its worker processes with pickle, which finds a function by its module and name. So ``fn``
    must pickle (the local check, same message), and not live in ``__main__``: an actor's
    ``__main__`` is Ray's worker, not your script or notebook.

    >>> from dfbatch import BatchConfig
    >>> check_ray_fn(lambda b: b, BatchConfig(executor="process"))
    Traceback (most recent call last):
    ...
    dfbatch.errors.ConfigError: executor='process' sends fn to worker processes, but ...
    """
    if cfg.executor != "process" or is_async(fn):
        return
    _check_pickles(fn)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if module == "__main__":
        msg = (f"engine='ray' with executor='process': each actor sends fn to its worker "
               f"processes, which import it by name, but {fn!r} is defined in __main__ (your "
               "script), which they cannot import; move it to a .py module importable on "
               "every node, or use executor='thread'")
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
