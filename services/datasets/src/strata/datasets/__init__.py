"""Strata datasets: Uploads streamed to storage, ingested to Parquet, profiled, previewed, versioned and shared."""
