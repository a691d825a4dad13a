"""Analysis blocks: named, versioned steps that compile to one DuckDB statement over their inputs (see base.py)."""
