"""``SimServer``: run the simulated endpoint in-process (``async with``) or in a thread (``with``).

Both forms yield the base URL (``http://127.0.0.1:<port>/v1``) to give to an OpenAI client or to
``dfbatch.llm.chat(..., base_url=url)``; ``server.stats`` records what was served.

Examples
--------
>>> import json, urllib.request
>>> from dfbatch.sim import serve
>>> server = serve(port=0, rpm=60, time_scale=0.01)
>>> with server as url:
...     with urllib.request.urlopen(url + "/models") as r:
...         print([m["id"] for m in json.load(r)["data"]])
['sim-chat', 'sim-embed']
>>> server.stats.snapshot().requests  # /v1/models is not counted
0
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

from dfbatch.sim.config import SimConfig
from dfbatch.sim.stats import SimStats

_START_TIMEOUT_S = 30.0


class SimServer:
    """A simulated OpenAI-compatible endpoint; a sync *and* an async context manager.

    Parameters
    ----------
    config
        A ``SimConfig``; keyword arguments override its fields (``rpm=..., error_rate=...``).
    host, port
        Where to listen; ``port=0`` picks a free port (read it from ``url``).
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **overrides: Any,
    ) -> None:
        self.config = SimConfig.from_kwargs(config, **overrides)
        self.host = host
        self.port = port
        self.stats = SimStats(time_scale=self.config.time_scale)
        self._runner: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-compatible API (ends in ``/v1``)."""
        if self._runner is None:
            msg = "the simulator is not running; use `with serve(...) as url:`"
            raise RuntimeError(msg)
        return f"http://{self.host}:{self.port}/v1"

    def __repr__(self) -> str:
        state = f"url={self.url!r}" if self._runner is not None else "stopped"
        return f"SimServer({state}, rpm={self.config.rpm}, tpm={self.config.tpm})"

    # -- async: in the running loop --------------------------------------------------------
    async def start(self) -> str:
        """Start listening in the running event loop; returns the base URL."""
        try:
            from aiohttp import web
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            msg = "the simulator needs aiohttp: pip install 'dfbatch[llm]'"
            raise ImportError(msg) from e
        from dfbatch.sim.app import SimApp

        if self._runner is not None:
            msg = "this SimServer is already running"
            raise RuntimeError(msg)
        app = SimApp(self.config, self.stats).build()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024)  # bursts of new clients
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        self.stats.start()  # simulated time (outage, calendar windows) counts from here
        return self.url

    async def stop(self) -> None:
        """Stop listening; in-flight requests are woken up and answered or dropped."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync: in a background thread with its own loop ------------------------------------
    def open(self) -> str:
        """Start in a background thread (for notebooks, where ``with`` cannot span cells).

        Returns the base URL; call ``close()`` when done.
        """
        return self.__enter__()

    def close(self) -> None:
        """Stop a server started with ``open()`` (or ``with``); safe to call twice."""
        self.__exit__(None, None, None)

    def __enter__(self) -> str:
        if self._thread is not None:
            msg = "this SimServer is already running"
            raise RuntimeError(msg)
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, failure), name="dfbatch-sim", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S):
            msg = f"the simulator did not start within {_START_TIMEOUT_S:.0f} s"
            raise RuntimeError(msg)
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self.url

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join()
        self._thread = self._loop = self._stop = None

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as e:
                failure.append(e)
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.stop()

        asyncio.run(main())


def serve(
    port: int = 0, *, host: str = "127.0.0.1", config: SimConfig | None = None, **overrides: Any
) -> SimServer:
    """A ``SimServer`` to use as ``with serve(...) as url:`` or ``async with serve(...) as url:``.

    Keyword arguments are ``SimConfig`` fields (``rpm``, ``tpm``, ``ttft_s``, ``error_rate``,
    ``time_scale``, ...). Keep the returned object to read ``server.stats`` afterwards.
    """
    return SimServer(config, host=host, port=port, **overrides)
