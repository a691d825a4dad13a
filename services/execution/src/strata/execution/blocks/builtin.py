"""The built-in blocks (each lives in the module of its kind; this is the list the registry serves)."""

from __future__ import annotations

from .aggregate import AggregateBlock, PivotBlock, TimeSeriesBlock, TopNBlock
from .base import Block
from .statistics import CorrelationBlock, DescribeBlock, ForecastBlock, OutliersBlock
from .template import SqlBlock
from .transform import FilterBlock, JoinBlock, SelectBlock

BUILTINS: tuple[Block, ...] = (
    FilterBlock(),
    SelectBlock(),
    AggregateBlock(),
    TimeSeriesBlock(),
    TopNBlock(),
    JoinBlock(),
    PivotBlock(),
    DescribeBlock(),
    CorrelationBlock(),
    OutliersBlock(),
    ForecastBlock(),
    SqlBlock(),
)

__all__ = [
    "BUILTINS",
    "AggregateBlock",
    "CorrelationBlock",
    "DescribeBlock",
    "FilterBlock",
    "ForecastBlock",
    "JoinBlock",
    "OutliersBlock",
    "PivotBlock",
    "SelectBlock",
    "SqlBlock",
    "TimeSeriesBlock",
    "TopNBlock",
]
