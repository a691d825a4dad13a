"""Strata execution: SQL queries, analysis blocks and workflows, run as jobs on a durable queue."""
