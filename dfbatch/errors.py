"""The exceptions dfbatch raises or records.

Programmer errors are raised before anything runs; errors *during* a run are values: the row
gets ``error`` text and the run goes on. The tree::

    DfbatchError                    base of everything dfbatch raises
    ├── ConfigError (ValueError)    a bad argument: names it and says the fix
    ├── ColumnError (KeyError)      a missing or clashing column, with a did-you-mean hint
    ├── TokenizerError              an encoding that cannot be loaded (never a silent fallback)
    ├── CheckpointError             a checkpoint that belongs to another run, or is damaged
    ├── BatchError                  raised *by your fn* to steer the pool (never escapes a run)
    │   ├── RetryableError          try this batch again later (``retry_after`` seconds hint)
    │   │   └── StragglerTimeoutError  a call ran far past its size's latency (adaptive timeout)
    │   └── FatalError              do not retry; bisect a multi-row batch to isolate the cause
    │       └── OutputError         fn's return value does not fit its batch (recorded, not raised)
    ├── NoProgressError             no call was answered for ``outage_timeout`` s while calls
    │                               failed (service down, or every call rate-limited); the
    │                               cause of a RunStoppedError (never escapes a run itself)
    ├── FrameError (RuntimeError)   the dashboard's frame process failed (the run goes on)
    └── RunStoppedError             an error no retry can fix (bad key, no permission, unknown
                                    model, no quota) stopped the run; ``.partial`` holds the rows

    PartialResultWarning            the run stopped before every row finished
    CheckpointWarning               a damaged checkpoint part was set aside; its rows run again
    StillRunningWarning             a plain fn's call outlived its timeout (a thread runs on)
    LateUsageWarning                report_usage came after its call returned: not counted

``RowError`` is not raised: put an instance in the list your fn returns to fail that one row.
"""

from __future__ import annotations

import difflib
import os
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterable
from types import FrameType


class DfbatchError(Exception):
    """Base class of every exception dfbatch raises."""


class ConfigError(DfbatchError, ValueError):
    """A configuration value is invalid; the message names the argument and the fix."""


class ColumnError(DfbatchError, KeyError):
    """A column is missing or would be overwritten."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class TokenizerError(DfbatchError):
    """A tokenizer (encoding, model or callable) cannot be loaded or misbehaves."""


class CheckpointError(DfbatchError):
    """A checkpoint directory does not match this run, or cannot be read."""


class BatchError(DfbatchError):
    """Base of the errors a user's fn may raise to tell the pool what to do."""


class RetryableError(BatchError):
    """Raise from fn to retry the batch; ``retry_after`` (seconds) is honored as a minimum wait."""

    def __init__(self, message: str = "retryable error", *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class StragglerTimeoutError(RetryableError):
    """A call ran far beyond the latency expected for its size (``hedge_after``'s adaptive
    timeout); it is cancelled and retried as a transient error."""


class MalformedReplyError(RetryableError):
    """The provider answered with something that is not a valid reply (not JSON, an HTML page,
    no ``choices``, an error body with status 200): a transient error, retried."""


class FatalError(BatchError):
    """Raise from fn for an error that will not go away by retrying the same rows."""


class OutputError(FatalError):
    """fn's return value does not fit the batch (wrong length, type or column names)."""


class FrameError(DfbatchError, RuntimeError):
    """The dashboard's frame process could not be started or stopped answering."""


class NoProgressError(DfbatchError):
    """No call was answered for ``outage_timeout`` seconds while calls kept failing with outages
    (connection errors, timeouts, 5xx) or rate-limit 429s. ``cause`` is ``"outage"`` or
    ``"rate_limit"`` (what the last failure was), or ``"retry_after"``: a 429 asked for a
    longer wait than ``outage_timeout``. It stops the run (``RunStoppedError``)."""

    def __init__(self, message: str, *, cause: str = "outage") -> None:
        super().__init__(message)
        self.cause = cause


class RunStoppedError(DfbatchError):
    """The run stopped at once: a call failed with an error that no retry can fix (the API key
    refused, no permission, an unknown model, no quota).

    Also raised when no call was answered for ``outage_timeout`` seconds while calls failed
    (a dead server, or a provider that refuses every call; see ``NoProgressError``).

    The message says the cause, the fix and the server's words. ``partial`` is the result so
    far (a DataFrame like the one the run returns; unfinished rows have ``error="cancelled"``),
    ``None`` when nothing could be assembled. A checkpointed run resumes where it stopped once
    the cause is fixed.
    """

    def __init__(self, message: str, *, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class PartialResultWarning(UserWarning):
    """The run was stopped (Ctrl-C / Stop button) before every row finished."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint part was set aside; its rows run again."""


class ReplanWarning(UserWarning):
    """``process`` got plan settings that differ from the plan already in the frame: it ran
    under a new plan made with them."""


class StillRunningWarning(UserWarning):
    """A plain fn's call timed out (or the run stopped) but still runs in a worker thread.

    Its rows carry an error; the (daemon) thread does not keep the interpreter from exiting.
    """


class LateUsageWarning(UserWarning):
    """``dfbatch.report_usage`` was called after its call of fn had returned (from a task or
    thread that outlived the call): those tokens are counted nowhere -- not in the live view,
    the events or the TPM limit -- so every total agrees. Call it before fn returns. Told once
    a run."""


class FnInterrupt(BaseException):  # a carrier, never seen by the user
    """Carries a ``KeyboardInterrupt`` / ``SystemExit`` that fn raised in a worker thread.

    asyncio lets those two escape its loop at once, past the run's handler that attaches the
    partial result; wrapped, they travel like any other exception from fn and are unwrapped
    (``args[0]``) when the pool re-raises them, so the user sees fn's own exception with
    ``exc.partial``.
    """


class RowError(Exception):
    """A per-row error value: return it in fn's output list in place of that row's output.

    Examples
    --------
    >>> import polars as pl, dfbatch
    >>> def fn(batch):
    ...     return [dfbatch.RowError("unclear") if t == "?" else t.upper() for t in batch["text"]]
    >>> out = dfbatch.process(pl.DataFrame({"text": ["a", "?"]}), fn, text="text", progress=False)
    >>> out.select("output", "error").rows()
    [('A', None), (None, 'RowError: unclear')]
    """


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return a ``" Hint: did you mean 'x'?"`` suffix, or ``""`` when nothing is close.

    >>> did_you_mean("txt", ["text", "id"])
    " Hint: did you mean 'text'?"
    """
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Hint: did you mean {close[0]!r}?" if close else ""


_OWN = os.path.dirname(os.path.abspath(__file__))
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"])


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn at the user's line: the first frame outside dfbatch, the standard library and
    what a blocking caller waits in (zmq polls, jupyter-ui-poll). A run in a worker thread (a
    blocking ``process()`` under a running loop) has no user frame: the caller waiting in the
    main thread is used."""
    frame = _user_frame(sys._getframe(1))
    if frame is None:
        frame = _user_frame(sys._current_frames().get(threading.main_thread().ident or 0))
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message, category, frame.f_code.co_filename, frame.f_lineno,
        module=module_globals.get("__name__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
    )  # no module_globals: a `python -c` __main__'s loader cannot give its source


# what a blocking caller waits in while its run works in a thread (the kernel's widget pump)
_WAITING = ("nest_asyncio", f"{os.sep}zmq{os.sep}", f"{os.sep}jupyter_ui_poll{os.sep}")


def _user_frame(frame: FrameType | None) -> FrameType | None:
    while frame is not None:
        name = frame.f_code.co_filename
        path = os.path.abspath(name)
        stdlib = path.startswith(_STDLIB) and "-packages" not in path
        internal = (stdlib or path.startswith(_OWN) or name.startswith("<frozen")
                    or any(part in path for part in _WAITING))
        if not internal:
            return frame
        frame = frame.f_back
    return None
