"""Strata schemas: A protobuf-first schema registry with compatibility rules and a Confluent-compatible API."""
