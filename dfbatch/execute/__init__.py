"""One run on one event loop: the agent pool, its limits, retries, batch sizing, outputs, result.

Internal: the public entry points are ``dfbatch.process`` / ``dfbatch.aprocess``
(``dfbatch.run``), which prepare the batches and hand them to the pool here.
"""
