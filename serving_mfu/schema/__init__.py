"""The shapes that cross a boundary, read by several layers: the report `/metrics/mfu` serves and the
functions that build it from counters (pydantic, as FastAPI serves it), the credibility verdict of a
peak, and an engine's published snapshot and the readers' totals (snapshot: msgspec, typed from the
counter table).  Beneath runtime, serve and loadgen; above the counter table (serving_mfu.cost.counters)."""
