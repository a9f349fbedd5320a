"""One run on one event loop: batches in, per-row outcomes out.

``_pool`` (the agent loop) wires ``_scheduler`` (which batch next: deques, stealing, resizing,
bisection; synchronous), a caller from ``_caller`` (one batch -> one verdict: limits, timeout,
retries, hedging; ``_threads`` for a plain fn) and ``_recorder`` (outcomes, events, journal
hook), under the limit stack ``_stack`` builds once per run from ``_limits``, ``_retry`` and
``_sizing``. ``_outputs`` checks fn's return value, ``_result`` assembles the result frame,
``_loop`` runs it all from sync code. Internal: the public entry points are ``dfbatch.process``
/ ``dfbatch.aprocess`` (``dfbatch.run``).
"""
