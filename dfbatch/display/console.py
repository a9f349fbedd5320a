"""The terminal view: a tqdm bar with the run's key figures in its postfix.

Examples
--------
>>> import io
>>> from dfbatch.events import RunStats
>>> from dfbatch.display.console import ConsoleDisplay, postfix
>>> s = RunStats(total_rows=8, rows_done=8, tokens_done=4000, elapsed_s=2.0, retries=1,
...              rate_limited=1, finished=True)
>>> postfix(s)
'4 rows/s, 2,000 tok/s, 0 in flight, 1 retries, 1×429, 0 errors'
>>> out = io.StringIO()
>>> bar = ConsoleDisplay(8, file=out)
>>> bar.close(s)
>>> "8/8 rows" in out.getvalue() and "1×429" in out.getvalue()
True
>>> postfix(RunStats(cached_rows=990)).endswith("0 errors, 990 cached")  # answered by cache=
True
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from dfbatch.display import fmt_count, fmt_duration
from dfbatch.events import RunStats

if TYPE_CHECKING:
    from tqdm import tqdm

_FORMAT = (  # pct: whole percent rounded down (never 100% before the last row)
    "{desc}{pct:3d}%|{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{eta}{postfix}]"
)


def postfix(stats: RunStats) -> str:
    """The key figures of a snapshot, as shown after the bar (a Batch API run: its jobs)."""
    if stats.jobs:
        from dfbatch.display.jobs import jobs_summary

        return jobs_summary(stats)
    oldest = ""
    if stats.in_flight and stats.oldest_in_flight_s >= 1:
        oldest = f" (oldest {fmt_duration(stats.oldest_in_flight_s)})"
    cancelled = f", {stats.rows_cancelled:,} cancelled" if stats.rows_cancelled else ""
    return (
        f"{fmt_count(stats.rows_per_s)} rows/s, {fmt_count(stats.tokens_per_s)} tok/s, "
        f"{stats.in_flight} in flight{oldest}, {stats.retries} retries, "
        f"{stats.rate_limited}×429, {stats.errors} errors{cancelled}"
        + (f", {stats.cached_rows:,} cached" if stats.cached_rows else "")
    )


class ConsoleDisplay:
    """A tqdm bar on ``file`` (stderr by default), advanced from ``RunStats`` snapshots."""

    def __init__(self, total_rows: int, *, file: TextIO | None = None, **tqdm_kwargs: Any) -> None:
        try:
            from tqdm import tqdm as tqdm_cls
        except ImportError as exc:  # pragma: no cover - tqdm is a core dependency
            msg = "progress='bar' needs tqdm; install it with `pip install tqdm`"
            raise ImportError(msg) from exc
        options: dict[str, Any] = {"bar_format": _FORMAT, "dynamic_ncols": True,
                                   "mininterval": 0.2, "leave": True, **tqdm_kwargs}
        self.bar: tqdm = _floor_percent(tqdm_cls)(
            total=total_rows, file=file if file is not None else sys.stderr, **options
        )
        self._closed = False

    def update(self, stats: RunStats) -> None:
        """Advance the bar to ``stats.rows_done`` and refresh the postfix."""
        if stats.total_shown and self.bar.total != stats.total_shown:  # a resumed run
            self.bar.total = stats.total_shown
        delta = stats.rows_shown - self.bar.n
        self.bar.eta_text = fmt_duration(stats.eta_s)  # type: ignore[attr-defined]
        self.bar.set_postfix_str(postfix(stats), refresh=False)
        if delta > 0:
            self.bar.update(delta)  # refreshes at most every mininterval
        else:
            self.bar.refresh()

    def close(self, stats: RunStats) -> None:
        """Final state: full bar when finished, 'stopped' / 'failed' in front otherwise."""
        if self._closed:
            return
        self._closed = True
        if stats.cancelled:
            self.bar.set_description_str("stopped ", refresh=False)
        elif not stats.finished:
            self.bar.set_description_str("failed ", refresh=False)
        if stats.total_shown:
            self.bar.total = stats.total_shown
        self.bar.n = stats.rows_shown
        self.bar.eta_text = fmt_duration(stats.eta_s)  # type: ignore[attr-defined]
        self.bar.set_postfix_str(postfix(stats), refresh=False)
        self.bar.close()  # draws the final state once
        if stats.jobs:  # a Batch API run: one line per job under the bar
            from dfbatch.display.jobs import job_lines

            self.bar.write("\n".join(job_lines(stats)), file=self.bar.fp)


def _floor_percent(cls: type[tqdm]) -> type[tqdm]:
    """``cls`` with a ``pct`` field in its format: the whole percent done, rounded down."""

    class Bar(cls):  # type: ignore[valid-type,misc]
        @property
        def format_dict(self) -> dict[str, Any]:
            d: dict[str, Any] = super().format_dict
            total = d.get("total") or 0
            d["pct"] = int(100 * d["n"] / total) if total else 0
            d["eta"] = getattr(self, "eta_text", "?")  # the run's ETA, rate limits included
            return d

    return Bar
