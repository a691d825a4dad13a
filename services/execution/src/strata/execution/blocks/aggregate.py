"""Blocks that summarise: ``aggregate``, ``time_series``, ``top_n`` and ``pivot``."""

# ruff: noqa: S608 - SQL here is built from quote()d names of real input columns and bound parameters only

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from strata.common.columns import column_kind

from ._common import (
    BUCKETS,
    METRIC_FNS,
    METRIC_SCHEMA,
    NUMERIC,
    Metric,
    Path,
    Plan,
    PlannedBlock,
    bucket_sql,
    bucket_type,
    cfg,
    check_bucket,
    clashes,
    convert_or_problem,
    group_columns,
    resolve,
    resolve_metric,
    shift_sql,
    string_list,
)
from .base import Column, Columns, Params, Problem, quote

_METRICS: Final[dict[str, Any]] = {
    "type": "array",
    "title": "Metrics",
    "minItems": 1,
    "maxItems": 50,
    "items": METRIC_SCHEMA,
}
_GROUP_BY: Final = string_list("Group by", "Columns whose values make the groups.", max_items=20)


def _metrics(
    config: Mapping[str, Any], columns: Columns, problems: list[Problem], key: str = "metrics"
) -> list[Metric]:
    out = []
    for i, spec in enumerate(config[key]):
        metric = resolve_metric(spec, columns, cfg(key, i), problems)
        if metric is not None:
            out.append(metric)
    return out


def _metric_names(config: Mapping[str, Any], key: str = "metrics") -> list[tuple[str, Path]]:
    from ._common import metric_name

    return [
        (metric_name(spec), cfg(key, i, "as") if "as" in spec else cfg(key, i)) for i, spec in enumerate(config[key])
    ]


# --- aggregate -----------------------------------------------------------------------------------------------------


class AggregateBlock(PlannedBlock):
    id: ClassVar[str] = "aggregate"
    name: ClassVar[str] = "Aggregate"
    category: ClassVar[str] = "aggregate"
    description: ClassVar[str] = (
        "Group rows and compute metrics per group: count, distinct count, sum, mean, min, max, median, quantiles, "
        "standard deviation. Without group columns: one row of totals. Rows come ordered by the group columns."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Aggregate",
        "properties": {"group_by": {**_GROUP_BY, "default": []}, "metrics": _METRICS},
        "required": ["metrics"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "One row per group: the group columns, then one column per metric.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        groups = group_columns(config, columns, problems)
        metrics = _metrics(config, columns, problems)
        clashes(
            [(g, cfg("group_by", i)) for i, g in enumerate(config.get("group_by", []))] + _metric_names(config),
            problems,
        )
        out = [Column(g.name, g.type) for g in groups] + [Column(m.name, m.type) for m in metrics]

        def render(params: Params) -> str:
            items = [quote(g.name) for g in groups] + [f"{m.sql(params)} AS {quote(m.name)}" for m in metrics]
            sql = f'SELECT {", ".join(items)} FROM "data"'
            if groups:
                keys = ", ".join(quote(g.name) for g in groups)
                sql += f" GROUP BY {keys} ORDER BY {keys} NULLS LAST"
            return sql

        return Plan(out, render)


# --- time series ---------------------------------------------------------------------------------------------------


class TimeSeriesBlock(PlannedBlock):
    id: ClassVar[str] = "time_series"
    name: ClassVar[str] = "Time series"
    category: ClassVar[str] = "time"
    description: ClassVar[str] = (
        "Metrics per time bucket (minute, hour, day, week starting Monday, month; time zone aware timestamps in "
        "UTC), optionally per group, with empty buckets filled and, for KPI cards, each metric's change against the "
        "previous bucket: <metric>_previous, <metric>_delta and <metric>_delta_pct (a fraction: 0.1 is +10 %)."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Time series",
        "properties": {
            "time": {"type": "string", "minLength": 1, "title": "Time column", "description": "A date or timestamp."},
            "bucket": {"type": "string", "enum": list(BUCKETS), "default": "day", "title": "Bucket"},
            "metrics": _METRICS,
            "group_by": {**_GROUP_BY, "default": [], "description": "One series per combination of these columns."},
            "compare": {
                "type": "boolean",
                "default": False,
                "title": "Change against the previous period",
                "description": "Add <metric>_previous, _delta and _delta_pct for each numeric metric. Without "
                "fill, the previous period is the previous bucket that has rows.",
            },
            "fill": {
                "type": "boolean",
                "default": False,
                "title": "Fill empty buckets",
                "description": "Add the buckets between the first and the last that have no rows (counts and sums 0, "
                "other metrics null), for every group.",
            },
            "bucket_column": {
                "type": "string",
                "minLength": 1,
                "maxLength": 128,
                "default": "bucket",
                "title": "Bucket column name",
            },
        },
        "required": ["time", "metrics"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "One row per bucket (and group): bucket, the group columns, the metrics, and with compare "
        "<metric>_previous, <metric>_delta, <metric>_delta_pct.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        time_col = resolve(
            columns,
            config["time"],
            cfg("time"),
            problems,
            kinds=frozenset({"date", "timestamp", "timestamptz"}),
            expected="temporal",
        )
        bucket = config.get("bucket", "day")
        if time_col is not None:
            check_bucket(time_col, bucket, cfg("bucket"), problems)
        groups = group_columns(config, columns, problems)
        metrics = _metrics(config, columns, problems)
        compare = bool(config.get("compare", False))
        fill = bool(config.get("fill", False))
        bname = config.get("bucket_column", "bucket")
        names = [(bname, cfg("bucket_column"))]
        names += [(g, cfg("group_by", i)) for i, g in enumerate(config.get("group_by", []))]
        names += _metric_names(config)
        if compare:
            for i, metric in enumerate(metrics):
                if not metric.numeric:
                    problems.append(
                        Problem(
                            cfg("metrics", i),
                            f"compare needs numeric metrics; {metric.name!r} is {metric.type}.",
                            "WRONG_COLUMN_TYPE",
                        )
                    )
                for suffix in ("_previous", "_delta", "_delta_pct"):
                    names.append((metric.name + suffix, cfg("metrics", i)))
        clashes(names, problems)
        if time_col is None or problems:
            return None
        btype = bucket_type(time_col, bucket)
        out = [Column(bname, btype), *(Column(g.name, g.type) for g in groups)]
        out += [Column(m.name, m.type) for m in metrics]
        if compare:
            for m in metrics:
                out += [
                    Column(f"{m.name}_previous", m.type),
                    Column(f"{m.name}_delta", "DOUBLE"),
                    Column(f"{m.name}_delta_pct", "DOUBLE"),
                ]
        assert time_col is not None
        tcol: Column = time_col

        def render(params: Params) -> str:
            b = quote(bname)
            keys = [quote(g.name) for g in groups]
            agg_items = [f"{bucket_sql(tcol, bucket)} AS {b}", *keys]
            agg_items += [f"{m.sql(params)} AS {quote(m.name)}" for m in metrics]
            group = ", ".join([b, *keys])
            sql = (
                f'WITH agg AS (SELECT {", ".join(agg_items)} FROM "data" WHERE {quote(tcol.name)} IS NOT NULL '
                f"GROUP BY {group})"
            )
            source = "agg"
            if fill:
                zero = {"count", "count_distinct", "sum"}
                span = f"SELECT min({b}) AS lo, max({b}) AS hi, date_diff('{bucket}', min({b}), max({b})) AS n FROM agg"
                grid_groups = f", (SELECT DISTINCT {', '.join(keys)} FROM agg) AS g" if keys else ""
                filled = [f"grid.{b}", *(f"grid.{k}" for k in keys)]
                for m in metrics:
                    value = f"agg.{quote(m.name)}"
                    filled.append(
                        f"coalesce({value}, 0) AS {quote(m.name)}" if m.fn in zero else f"{value} AS {quote(m.name)}"
                    )
                join_on = " AND ".join(
                    [f"agg.{b} = grid.{b}", *(f"agg.{k} IS NOT DISTINCT FROM grid.{k}" for k in keys)]
                )
                sql += (
                    f", span AS ({span}), grid AS (SELECT {shift_sql('span.lo', bucket, 's.i', btype)} AS {b}"
                    f"{''.join(', g.' + k for k in keys)} FROM span, range(0, span.n + 1) AS s(i){grid_groups}), "
                    f"filled AS (SELECT {', '.join(filled)} FROM grid LEFT JOIN agg ON {join_on})"
                )
                source = "filled"
            items = [b, *keys] + [quote(m.name) for m in metrics]
            if compare:
                window = f"OVER (PARTITION BY {', '.join(keys)} ORDER BY {b})" if keys else f"OVER (ORDER BY {b})"
                for m in metrics:
                    v = quote(m.name)
                    prev = f"lag({v}) {window}"
                    items += [
                        f"{prev} AS {quote(m.name + '_previous')}",
                        f"CAST({v} AS DOUBLE) - CAST({prev} AS DOUBLE) AS {quote(m.name + '_delta')}",
                        f"CASE WHEN {prev} = 0 THEN NULL ELSE (CAST({v} AS DOUBLE) - CAST({prev} AS DOUBLE)) "
                        f"/ abs(CAST({prev} AS DOUBLE)) END AS {quote(m.name + '_delta_pct')}",
                    ]
            order = ", ".join([*(f"{k} NULLS LAST" for k in keys), b])
            return f"{sql} SELECT {', '.join(items)} FROM {source} ORDER BY {order}"

        return Plan(out, render)


# --- top n ---------------------------------------------------------------------------------------------------------


class TopNBlock(PlannedBlock):
    id: ClassVar[str] = "top_n"
    name: ClassVar[str] = "Top N"
    category: ClassVar[str] = "ranking"
    description: ClassVar[str] = (
        "A ranked leaderboard: rows (or groups, by a metric such as mean rating, with a minimum row count) ranked by "
        "a value, the first n kept, with each one's rank and percentile (the share of the other ranked rows it "
        "beats: 1.0 is the best). Rows whose value is null are not ranked."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Top N",
        "properties": {
            "group_by": {
                **_GROUP_BY,
                "default": [],
                "description": "Rank groups of rows (by metric) instead of rows (by order_by).",
            },
            "metric": {
                **METRIC_SCHEMA,
                "title": "Metric",
                "description": "With group_by: what each group is ranked by.",
            },
            "order_by": {
                "type": "string",
                "minLength": 1,
                "title": "Rank by column",
                "description": "Without group_by: the column rows are ranked by.",
            },
            "min_count": {
                "type": "integer",
                "minimum": 1,
                "title": "Minimum rows",
                "description": "With group_by: rank only groups of at least this many rows.",
            },
            "n": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10, "title": "How many"},
            "direction": {
                "type": "string",
                "enum": ["desc", "asc"],
                "default": "desc",
                "title": "Direction",
                "description": "desc: highest first; asc: lowest first.",
            },
            "ties": {
                "type": "string",
                "enum": ["include", "break"],
                "default": "include",
                "title": "Ties",
                "description": "include: rows that tie share a rank (1, 2, 2, 4) and all of those within n are kept, "
                "so more than n rows may come back; break: exactly n rows, ties ordered by the group columns.",
            },
        },
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "rank, then the group columns, the metric and row_count (with group_by) or the input's "
        "columns (without), then percentile.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        groups = group_columns(config, columns, problems)
        grouped = bool(config.get("group_by"))
        metric: Metric | None = None
        value_col: Column | None = None
        if grouped:
            if "metric" not in config:
                problems.append(Problem(cfg("metric"), "Ranking groups needs a metric.", "INVALID_CONFIG"))
            else:
                metric = resolve_metric(config["metric"], columns, cfg("metric"), problems)
            if "order_by" in config:
                problems.append(Problem(cfg("order_by"), "With group_by, rank by metric.", "INVALID_CONFIG"))
        else:
            if "order_by" not in config:
                problems.append(
                    Problem(cfg("order_by"), "Without group_by, say which column ranks the rows.", "INVALID_CONFIG")
                )
            else:
                value_col = resolve(
                    columns,
                    config["order_by"],
                    cfg("order_by"),
                    problems,
                    kinds=frozenset(NUMERIC | {"date", "timestamp", "timestamptz", "string"}),
                    expected="ordered",
                )
            for key in ("metric", "min_count"):
                if key in config:
                    problems.append(Problem(cfg(key), f"{key} applies with group_by only.", "INVALID_CONFIG"))
        if grouped:
            names = [("rank", cfg("group_by")), *((g, cfg("group_by", i)) for i, g in enumerate(config["group_by"]))]
            if metric is not None:
                names += [(metric.name, cfg("metric")), ("row_count", cfg("metric")), ("percentile", cfg("metric"))]
        else:
            names = [
                ("rank", cfg("order_by")),
                *((c.name, cfg("order_by")) for c in columns),
                ("percentile", cfg("order_by")),
            ]
        clashes(names, problems)
        if problems:
            return None
        n = int(config.get("n", 10))
        desc = config.get("direction", "desc") == "desc"
        rank_fn = "rank()" if config.get("ties", "include") == "include" else "row_number()"
        if grouped:
            assert metric is not None
            m = metric
            out = [Column("rank", "BIGINT"), *(Column(g.name, g.type) for g in groups)]
            out += [Column(m.name, m.type), Column("row_count", "BIGINT"), Column("percentile", "DOUBLE")]
        else:
            assert value_col is not None
            vcol = value_col
            out = [Column("rank", "BIGINT"), *columns, Column("percentile", "DOUBLE")]
        min_count = config.get("min_count")

        def render(params: Params) -> str:
            if grouped:
                keys = [quote(g.name) for g in groups]
                value = quote(m.name)
                having = f" HAVING count(*) >= {params.add(min_count)}" if min_count is not None else ""
                base = (
                    f'SELECT {", ".join(keys)}, {m.sql(params)} AS {value}, count(*) AS "row_count" '
                    f'FROM "data" GROUP BY {", ".join(keys)}{having}'
                )
                tiebreak = ", ".join(f"{k} NULLS LAST" for k in keys)
                shown = [*keys, value, '"row_count"']
            else:
                value = quote(vcol.name)
                base = 'SELECT * FROM "data"'
                tiebreak = ""
                shown = [quote(c.name) for c in columns]
            direction = "DESC" if desc else "ASC"
            worst_first = "ASC" if desc else "DESC"
            rank_order = f"{value} {direction}" + (f", {tiebreak}" if tiebreak and rank_fn == "row_number()" else "")
            return (
                f'WITH base AS ({base}), ranked AS (SELECT *, {rank_fn} OVER (ORDER BY {rank_order}) AS "rank", '
                f'percent_rank() OVER (ORDER BY {value} {worst_first}) AS "percentile" '
                f"FROM base WHERE {value} IS NOT NULL) "
                f'SELECT "rank", {", ".join(shown)}, "percentile" FROM ranked WHERE "rank" <= {params.add(n)} '
                f'ORDER BY "rank"' + (f", {tiebreak}" if tiebreak else "")
            )

        return Plan(out, render)


# --- pivot ---------------------------------------------------------------------------------------------------------

MAX_PIVOT_VALUES: Final = 100
_PIVOT_FNS: Final = tuple(fn for fn in METRIC_FNS if fn != "quantile")


class PivotBlock(PlannedBlock):
    id: ClassVar[str] = "pivot"
    name: ClassVar[str] = "Pivot"
    category: ClassVar[str] = "aggregate"
    description: ClassVar[str] = (
        "Spread the values of one column into columns: one row per combination of the row columns, one column per "
        "listed value (named <prefix><value>), holding an aggregate of the value column over the matching rows. "
        "The values are listed in the config (at most 100) so the output's columns are known before it runs."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Pivot",
        "properties": {
            "rows": {**_GROUP_BY, "title": "Rows", "default": [], "description": "One output row per combination."},
            "column": {"type": "string", "minLength": 1, "title": "Column to spread"},
            "values": {
                "type": "array",
                "title": "Values",
                "description": "The values of the spread column that become columns, in order.",
                "items": {"type": ["string", "number", "boolean"]},
                "minItems": 1,
                "maxItems": MAX_PIVOT_VALUES,
                "uniqueItems": True,
            },
            "value": {
                "type": "string",
                "minLength": 1,
                "title": "Value column",
                "description": "The column aggregated in each cell (leave out to count rows).",
            },
            "fn": {"type": "string", "enum": list(_PIVOT_FNS), "default": "count", "title": "Function"},
            "prefix": {"type": "string", "maxLength": 64, "default": "", "title": "Column name prefix"},
        },
        "required": ["column", "values"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "The row columns, then one column per listed value.",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        rows = group_columns(config, columns, problems, key="rows")
        spread = resolve(columns, config["column"], cfg("column"), problems)
        spec: dict[str, Any] = {"fn": config.get("fn", "count")}
        if "value" in config:
            spec["column"] = config["value"]
        metric = resolve_metric(spec, columns, cfg(), problems, column_key="value")
        values: list[Any] = []
        if spread is not None:
            if column_kind(spread.type) in ("other", "time"):
                problems.append(
                    Problem(cfg("column"), f"Cannot spread {spread.name!r} ({spread.type}).", "WRONG_COLUMN_TYPE")
                )
            else:
                values = [
                    convert_or_problem(spread, v, cfg("values", i), problems) for i, v in enumerate(config["values"])
                ]
        prefix = config.get("prefix", "")
        names = [(r, cfg("rows", i)) for i, r in enumerate(config.get("rows", []))]
        names += [(f"{prefix}{_label(v)}", cfg("values", i)) for i, v in enumerate(config["values"])]
        clashes(names, problems)
        if spread is None or metric is None or problems:
            return None
        m, col = metric, spread
        out = [Column(r.name, r.type) for r in rows]
        out += [Column(f"{prefix}{_label(v)}", m.type) for v in config["values"]]
        labels = [f"{prefix}{_label(v)}" for v in config["values"]]

        def render(params: Params) -> str:
            keys = [quote(r.name) for r in rows]
            cells = [
                f"{m.sql(params, where=f'{quote(col.name)} = {params.add(v)}')} AS {quote(label)}"
                for v, label in zip(values, labels, strict=True)
            ]
            sql = f'SELECT {", ".join([*keys, *cells])} FROM "data"'
            if keys:
                sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)} NULLS LAST"
            return sql

        return Plan(out, render)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
