"""dfbatch: push a Polars DataFrame of texts through an expensive, rate-limited function.

Token-aware batches, a pool of async agents, errors as values, and a live view of every agent.

>>> import polars as pl, dfbatch
>>> df = pl.DataFrame({"text": ["hello world", "dfbatch", "polars"]})
>>> out = df.batch.process(lambda b: [t.upper() for t in b["text"]], progress=False)
>>> out.select("text", "output", "error").rows()
[('hello world', 'HELLO WORLD', None), ('dfbatch', 'DFBATCH', None), ('polars', 'POLARS', None)]
"""

from __future__ import annotations

from dfbatch import limits as limits  # dfbatch.limits.request: charge requests from inside fn
from dfbatch import namespace as _namespace  # registers df.batch / lf.batch
from dfbatch.config import BatchConfig, Columns
from dfbatch.errors import (
    BatchError,
    CheckpointError,
    CheckpointWarning,
    ColumnError,
    ConfigError,
    DfbatchError,
    FatalError,
    FrameError,
    LateUsageWarning,
    OutputError,
    PartialResultWarning,
    ReplanWarning,
    RetryableError,
    RowError,
    RunStoppedError,
    StillRunningWarning,
    TokenizerError,
)
from dfbatch.events import RunStats
from dfbatch.execute._usage import report_usage
from dfbatch.persist._cache import Cache
from dfbatch.plan import PlanSummary, plan, summary
from dfbatch.run._process import aprocess, process

__version__ = "0.1.0"

__all__ = [
    "BatchConfig",
    "BatchError",
    "Cache",
    "CheckpointError",
    "CheckpointWarning",
    "ColumnError",
    "Columns",
    "ConfigError",
    "DfbatchError",
    "FatalError",
    "FrameError",
    "LateUsageWarning",
    "OutputError",
    "PartialResultWarning",
    "PlanSummary",
    "ReplanWarning",
    "RetryableError",
    "RowError",
    "RunStats",
    "RunStoppedError",
    "StillRunningWarning",
    "TokenizerError",
    "__version__",
    "aprocess",
    "plan",
    "process",
    "report_usage",
    "summary",
]

del _namespace
