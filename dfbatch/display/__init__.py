"""Live views of a run: a notebook dashboard, a terminal bar, and static plots of a result.

``open_display`` picks the view for ``progress=``; every view renders ``RunStats`` snapshots
only and never raises into the run (a failure is logged once and the view goes quiet).
ipywidgets, matplotlib and tqdm are imported only when a view is opened.

Examples
--------
>>> from dfbatch.display import open_display, fmt_count, fmt_duration
>>> open_display(False, total_rows=10) is None
True
>>> fmt_count(1234), fmt_count(45_600), fmt_count(2_500_000), fmt_duration(75.2)
('1,234', '45.6k', '2.5M', '1:15')
>>> open_display("fancy", total_rows=10)
Traceback (most recent call last):
...
dfbatch.errors.ConfigError: progress must be 'auto', 'widget', 'bar', True or False, got 'fancy'
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Protocol

from dfbatch.errors import ConfigError
from dfbatch.events import RunStats

__all__ = ["Display", "fmt_count", "fmt_duration", "in_jupyter_kernel", "open_display"]

log = logging.getLogger("dfbatch.display")


class Display(Protocol):
    """What the run talks to: ``update`` while running (throttled by the caller), ``close`` once."""

    def update(self, stats: RunStats) -> None: ...

    def close(self, stats: RunStats) -> None: ...


def open_display(
    progress: object,
    *,
    total_rows: int,
    stop: Callable[[], None] | None = None,
) -> Display | None:
    """Open the live view chosen by ``progress``; None when there is nothing to show.

    Parameters
    ----------
    progress
        ``"auto"`` (or True): the notebook widget inside a Jupyter kernel with ipywidgets,
        else a tqdm bar when stderr is a terminal, else nothing. ``"widget"``: the notebook
        widget (a tqdm bar outside a kernel). ``"bar"``: a tqdm bar on stderr. False: nothing.
    total_rows
        Rows the run will process (the 100% mark).
    stop
        Called by the widget's Stop button to stop the run gracefully; None disables it.

    Returns
    -------
    Display or None
        A view whose ``update`` / ``close`` never raise.
    """
    kind = _choose(progress)
    if kind is None:
        return None
    try:
        if kind == "widget":
            from dfbatch.display.widget import WidgetDisplay

            return _Guarded(WidgetDisplay(total_rows, stop=stop))
        from dfbatch.display.console import ConsoleDisplay

        return _Guarded(ConsoleDisplay(total_rows))
    except ImportError:
        raise
    except Exception:  # a view that cannot open must not stop the run
        log.exception("dfbatch: could not open the %s progress view; running without it", kind)
        return None


def _choose(progress: object) -> str | None:
    if progress is False:
        return None
    if progress is True or progress == "auto":
        if in_jupyter_kernel() and importlib.util.find_spec("ipywidgets") is not None:
            return "widget"
        return "bar" if _stderr_is_tty() else None
    if progress == "widget":
        if in_jupyter_kernel():
            return "widget"
        log.info("dfbatch: progress='widget' needs a Jupyter kernel; showing a terminal bar")
        return "bar"
    if progress == "bar":
        return "bar"
    msg = f"progress must be 'auto', 'widget', 'bar', True or False, got {progress!r}"
    raise ConfigError(msg)


def in_jupyter_kernel() -> bool:
    """True inside a Jupyter kernel (ipykernel's ZMQInteractiveShell or a subclass, as in
    Colab), without importing IPython or ipykernel.

    >>> in_jupyter_kernel()
    False
    """
    ipython = sys.modules.get("IPython")
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    if ipython is None or zmqshell is None:
        return False
    return isinstance(ipython.get_ipython(), zmqshell.ZMQInteractiveShell)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Guarded:
    """Wraps a view so that it never raises into the run: the first error is logged, then quiet."""

    def __init__(self, inner: Display) -> None:
        self.inner = inner
        self.broken = False

    def update(self, stats: RunStats) -> None:
        if not self.broken:
            try:
                self.inner.update(stats)
            except Exception:
                self._fail("update")

    def close(self, stats: RunStats) -> None:
        try:
            self.inner.close(stats)
        except Exception:
            self._fail("close")

    def _fail(self, where: str) -> None:
        if not self.broken:
            self.broken = True
            log.exception("dfbatch: the progress view failed in %s; it stays quiet now", where)


def fmt_count(x: float) -> str:
    """Human count: ``1,234``, ``45.6k``, ``150k``, ``2.5M`` (one decimal below 10 if fractional).

    >>> [fmt_count(x) for x in (0, 3.25, 12.4, 9_999, 150_000, 250_000_000)]
    ['0', '3.2', '12', '9,999', '150k', '250M']
    """
    x = float(x)
    ax = abs(x)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= max(scale, 1e4):
            return f"{x / scale:.{0 if ax >= 100 * scale else 1}f}{suffix}"
    if ax >= 10 or x == int(x):
        return f"{x:,.0f}"
    return f"{x:.1f}"


def fmt_duration(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(max(0.0, seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
