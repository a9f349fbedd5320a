"""The front of a run: ``process`` / ``aprocess`` (one frame) and their streaming form
(``out=``: a LazyFrame in chunks to Parquet). They prepare the batches (``_prepare``), wire the
events to the live view (``_wiring``) and hand the run to ``dfbatch.execute``.
"""
