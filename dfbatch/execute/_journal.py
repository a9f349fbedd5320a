"""What a rate limit let through, and when: the charge log of one ``RateLimit``.

Split from ``_rate`` (the bucket and how it learns). The log keeps the charges of the last two
minutes, numbered, and remembers in each task which charge was its own, so that an answer can
be put back in time: the provider's ``remaining`` was true just after *that* charge (``sync``),
and a 429 belongs to the episode its charge was sent in. Windowed (a gateway's fixed minute:
``remaining`` stated with no ``reset``) it also sums the units of the last 60 s.

A busy run charges thousands of times a second: the log keeps its times and units in two
``array('d')`` (16 bytes a charge, not a tuple of two floats at ~100).

Examples
--------
>>> log = ChargeLog()
>>> log.add(0.0, 5.0); log.add(30.0, 5.0); log.mine()
(30.0, 5.0)
>>> log.windowed = True  # 3 more units fit once the charge at 0 s leaves the minute (+ 10 ms)
>>> round(log.window_wait(now=40.0, units=3.0, per_minute=12.0), 3)
20.01
"""

from __future__ import annotations

import bisect
import contextvars
from array import array

JOURNAL_S = 120.0  # charges older than this are forgotten (a reply that late is not synced)
_WINDOW_S = 60.0  # a per-minute limit's window (the windowed mode's log)
MARGIN_S = 0.01  # the windowed mode keeps this much more than the window (arrival delay) ...
MARGIN_MAX = 0.1  # ... grown (``widen``) on window-edge 429s up to this share of the window


class ChargeLog:
    """The recent charges ``(time, units)`` of one limit (module docstring)."""

    def __init__(self) -> None:
        self._times = array("d")  # charge number i + base: its time ...
        self._units = array("d")  # ... and its units
        self._base = 0  # charge number of the first logged charge
        self._last: contextvars.ContextVar[int] = contextvars.ContextVar("charge", default=-1)
        self.windowed = False
        self.window_s = _WINDOW_S  # windowed: the window's length (a policy's w=, else 60 s)
        self.margin_s = MARGIN_S
        self.quota: float | None = None  # windowed by a stated policy: its q a window
        self._widened_at = -1e18
        self._win_n = 0  # charge number of the oldest charge in the window log
        self._win_sum = 0.0  # units charged in the last window_s seconds
        self._prune_at = -1.0  # next time old charges are looked for (not at every charge)

    def add(self, now: float, units: float, keep_s: float = JOURNAL_S,
            merge_s: float = 0.0) -> None:
        """Log a charge (kept ``keep_s`` seconds); the caller's task remembers its number.
        ``merge_s``: a charge within that many seconds of the last one is added to it (an
        unknown limit's log, read only for rates over seconds: a fast run's log stays small)."""
        times = self._times
        if merge_s and times and now - times[-1] < merge_s and not self.windowed:
            self._last.set(self._base + len(times) - 1)
            self._units[-1] += units
            self._win_sum += units
            return
        self._last.set(self._base + len(times))
        times.append(now)
        self._units.append(units)
        self._win_sum += units
        if self.windowed:
            self._expire(now)  # (before pruning: the window is shorter than the journal)
        if now >= self._prune_at:  # (charges come in time order; at most every keep_s / 4)
            self._prune_at = now + keep_s / 4
            if times[0] < now - keep_s:
                stale = bisect.bisect_left(times, now - keep_s)
                del times[:stale]
                del self._units[:stale]
                self._base += stale

    def mine(self) -> tuple[float, float] | None:
        """This task's last charge ``(time, units)``, if still logged."""
        i = self._last.get() - self._base
        return (self._times[i], self._units[i]) if 0 <= i < len(self._times) else None

    def after_mine(self) -> list[tuple[float, float]]:
        """The charges ``(time, units)`` logged after this task's last one."""
        i = max(0, self._last.get() - self._base + 1)
        return list(zip(self._times[i:], self._units[i:], strict=True))

    def __len__(self) -> int:
        """Charges logged."""
        return len(self._times)

    @property
    def first_at(self) -> float | None:
        """Time of the oldest logged charge."""
        return self._times[0] if self._times else None

    def open_window(self, now: float, window_s: float = _WINDOW_S,
                    quota: float | None = None) -> None:
        """Start keeping every ``window_s`` seconds within the limit (from the charges logged
        so far); a shorter window than the one kept replaces it (a policy's ``w=1``).
        ``quota``: the units a window admits, as the provider stated them (``q=``); else the
        limit's share (``per_minute`` x ``window_s`` / 60: a user's lower rpm= then rounds
        down to whole requests a window; a stated window leaves it to the bucket)."""
        if not self.windowed or window_s < self.window_s:
            self.windowed, self.window_s = True, min(window_s, _WINDOW_S)
            self._win_n, self._win_sum = self._base, sum(self._units)
            self._expire(now)
        if quota is not None and window_s <= self.window_s:
            self.quota = quota

    def window_wait(self, now: float, units: float, per_minute: float) -> float:
        """Windowed: seconds until ``units`` more keep the last ``window_s`` within its share
        of ``per_minute``."""
        if not self.windowed or not per_minute:
            return 0.0
        self._expire(now)
        allowed = self.quota if self.quota is not None else per_minute * self.window_s / _WINDOW_S
        over = self._win_sum + min(units, allowed) - allowed
        if over <= 0:
            return 0.0
        freed, n = 0.0, max(0, self._win_n - self._base)
        for t, u in zip(self._times[n:], self._units[n:], strict=True):
            freed += u
            if freed >= over:
                return max(1e-3, t + self._span() - now)
        return self.window_s  # (not reached: the log holds what the sum counts)

    def _span(self) -> float:
        """The window kept, with a margin: the provider's window starts when a request
        *arrives*, a few ms after we sent it; a send exactly one window later arrived in it."""
        return self.window_s + min(self.margin_s, MARGIN_MAX * self.window_s)

    def widen(self, now: float) -> None:
        """A 429 at a window's edge: the arrival delays vary more than the margin; double it
        (from the start again when the last widening was over a minute ago: sparse 429s of
        other clients on a shared key do not ratchet it up for good)."""
        base = self.margin_s if now - self._widened_at < _WINDOW_S else MARGIN_S
        self.margin_s = min(2.0 * base, MARGIN_MAX * self.window_s)
        self._widened_at = now

    def _expire(self, now: float) -> None:
        n, times = self._win_n - self._base, self._times
        span = self._span()
        while 0 <= n < len(times) and times[n] <= now - span:
            self._win_sum -= self._units[n]
            n += 1
        self._win_n = self._base + max(0, n)
