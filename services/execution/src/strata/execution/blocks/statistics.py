"""Statistics blocks: ``describe``, ``correlation``, ``outliers`` and ``forecast``."""

# ruff: noqa: S608 - SQL here is built from quote()d names of real input columns and bound parameters only

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from strata.common.columns import column_kind

from ._common import (
    BUCKETS,
    NUMERIC,
    ORDERED,
    TEMPORAL,
    Plan,
    PlannedBlock,
    bucket_sql,
    bucket_type,
    cfg,
    check_bucket,
    clashes,
    group_columns,
    resolve,
    shift_sql,
    string_list,
)
from .base import Column, Columns, Params, Problem, quote

# --- describe ------------------------------------------------------------------------------------------------------


def _quantile_name(q: float) -> str:
    return f"p{q * 100:g}".replace(".", "_")


class DescribeBlock(PlannedBlock):
    id: ClassVar[str] = "describe"
    name: ClassVar[str] = "Describe"
    category: ClassVar[str] = "statistics"
    description: ClassVar[str] = (
        "The profile of a table, one row per column: rows, non-null count, nulls, distinct values, min and max (as "
        "text), and for numeric columns mean, sample standard deviation and quantiles (interpolated). One scan of the "
        "table, as a plain SELECT (SUMMARIZE-like, but it runs where SUMMARIZE is not allowed)."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Describe",
        "properties": {
            "columns": string_list(
                "Columns", "The columns to profile (leave out for all of them).", min_items=1, max_items=500
            ),
            "quantiles": {
                "type": "array",
                "title": "Quantiles",
                "description": "Quantiles of numeric columns, each 0 to 1 (output columns p25, p50...).",
                "items": {"type": "number", "minimum": 0, "maximum": 1},
                "maxItems": 10,
                "uniqueItems": True,
                "default": [0.25, 0.5, 0.75],
            },
        },
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "position": {"type": "integer"},
            "column": {"type": "string"},
            "type": {"type": "string"},
            "rows": {"type": "integer"},
            "count": {"type": "integer"},
            "nulls": {"type": "integer"},
            "distinct": {"type": "integer"},
            "min": {"type": ["string", "null"]},
            "max": {"type": ["string", "null"]},
            "mean": {"type": ["number", "null"]},
            "stddev": {"type": ["number", "null"]},
        },
        "additionalProperties": {"type": ["number", "null"], "description": "A quantile: p25, p50..."},
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        chosen = list(columns) if "columns" not in config else group_columns(config, columns, problems, key="columns")
        quantiles = [float(q) for q in config.get("quantiles", [0.25, 0.5, 0.75])]
        qnames = [_quantile_name(q) for q in quantiles]
        clashes([(n, cfg("quantiles", i)) for i, n in enumerate(qnames)], problems)
        if not chosen and not problems:
            problems.append(Problem(cfg("columns"), "The input has no columns to describe.", "INVALID_CONFIG"))
        base = ["position:INTEGER", "column:VARCHAR", "type:VARCHAR", "rows:BIGINT", "count:BIGINT", "nulls:BIGINT"]
        base += ["distinct:BIGINT", "min:VARCHAR", "max:VARCHAR", "mean:DOUBLE", "stddev:DOUBLE"]
        out = [Column(*item.split(":")) for item in base] + [Column(n, "DOUBLE") for n in qnames]

        def render(params: Params) -> str:
            aggs = ['count(*) AS "rows"']
            branches = []
            for i, column in enumerate(chosen):
                c = quote(column.name)
                kind = column_kind(column.type)
                aggs += [f"count({c}) AS c{i}", f"count(DISTINCT {c}) AS d{i}"]
                if kind in ORDERED:
                    aggs += [f"CAST(min({c}) AS VARCHAR) AS lo{i}", f"CAST(max({c}) AS VARCHAR) AS hi{i}"]
                if kind in NUMERIC:
                    aggs += [f"CAST(avg({c}) AS DOUBLE) AS m{i}", f"CAST(stddev_samp({c}) AS DOUBLE) AS s{i}"]
                    aggs += [
                        f"CAST(quantile_cont({c}, {params.add(q)}) AS DOUBLE) AS q{i}_{j}"
                        for j, q in enumerate(quantiles)
                    ]
                numeric = kind in NUMERIC
                ordered = kind in ORDERED
                items = [
                    f"CAST({params.add(i + 1)} AS INTEGER)",
                    f"CAST({params.add(column.name)} AS VARCHAR)",
                    f"CAST({params.add(column.type)} AS VARCHAR)",
                    '"rows"',
                    f"c{i}",
                    f'"rows" - c{i}',
                    f"d{i}",
                    f"lo{i}" if ordered else "CAST(NULL AS VARCHAR)",
                    f"hi{i}" if ordered else "CAST(NULL AS VARCHAR)",
                    f"m{i}" if numeric else "CAST(NULL AS DOUBLE)",
                    f"s{i}" if numeric else "CAST(NULL AS DOUBLE)",
                ]
                items += [f"q{i}_{j}" if numeric else "CAST(NULL AS DOUBLE)" for j in range(len(quantiles))]
                branches.append(
                    "SELECT "
                    + ", ".join(f"{item} AS {quote(col.name)}" for item, col in zip(items, out, strict=True))
                    + " FROM s"
                )
            union = " UNION ALL ".join(branches)
            stats = f'WITH s AS MATERIALIZED (SELECT {", ".join(aggs)} FROM "data")'
            return f'{stats} SELECT * FROM ({union}) ORDER BY "position"'

        return Plan(out, render)


# --- correlation ---------------------------------------------------------------------------------------------------


class CorrelationBlock(PlannedBlock):
    id: ClassVar[str] = "correlation"
    name: ClassVar[str] = "Correlation"
    category: ClassVar[str] = "statistics"
    description: ClassVar[str] = (
        "Pairwise Pearson correlation of numeric columns, in long format: one row per pair (column_a before "
        "column_b in the order given), r (null when a column is constant) and n, the rows where both are not null."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Correlation",
        "properties": {
            "columns": string_list(
                "Columns", "Numeric columns (leave out for every numeric column).", min_items=2, max_items=50
            ),
            "method": {"type": "string", "enum": ["pearson"], "default": "pearson", "title": "Method"},
        },
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "column_a": {"type": "string"},
            "column_b": {"type": "string"},
            "r": {"type": ["number", "null"]},
            "n": {"type": "integer"},
        },
        "required": ["column_a", "column_b", "r", "n"],
        "additionalProperties": False,
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        if "columns" in config:
            chosen = []
            for i, name in enumerate(config["columns"]):
                column = resolve(columns, name, cfg("columns", i), problems, kinds=NUMERIC, expected="numeric")
                if column is not None:
                    chosen.append(column)
        else:
            chosen = [c for c in columns if column_kind(c.type) in NUMERIC]
            if len(chosen) < 2:
                problems.append(Problem(cfg(), "The input has fewer than two numeric columns.", "INVALID_CONFIG"))
        pairs = [(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
        out = [
            Column("column_a", "VARCHAR"),
            Column("column_b", "VARCHAR"),
            Column("r", "DOUBLE"),
            Column("n", "BIGINT"),
        ]

        def render(params: Params) -> str:
            aggs = []
            branches = []
            for k, (a, b) in enumerate(pairs):
                x, y = f"CAST({quote(a.name)} AS DOUBLE)", f"CAST({quote(b.name)} AS DOUBLE)"
                aggs += [
                    f"corr({y}, {x}) AS r{k}",
                    f"count(*) FILTER (WHERE {x} IS NOT NULL AND {y} IS NOT NULL) AS n{k}",
                ]
                branches.append(
                    f'SELECT CAST({params.add(a.name)} AS VARCHAR) AS "column_a", '
                    f'CAST({params.add(b.name)} AS VARCHAR) AS "column_b", r{k} AS "r", n{k} AS "n", '
                    f'{k} AS "pair" FROM s'
                )
            union = " UNION ALL ".join(branches)
            return (
                f'WITH s AS MATERIALIZED (SELECT {", ".join(aggs)} FROM "data") '
                f'SELECT "column_a", "column_b", "r", "n" FROM ({union}) ORDER BY "pair"'
            )

        return Plan(out, render)


# --- outliers ------------------------------------------------------------------------------------------------------


class OutliersBlock(PlannedBlock):
    id: ClassVar[str] = "outliers"
    name: ClassVar[str] = "Outliers"
    category: ClassVar[str] = "statistics"
    description: ClassVar[str] = (
        "Flag rows whose value is unusual within its group (or the whole table). zscore: score = (x - mean) / "
        "sample stddev, an outlier when |score| > threshold. iqr: an outlier below Q1 - k*IQR or above Q3 + k*IQR; "
        "score = how many IQRs the value lies beyond the nearer quartile (0 inside them). Rows with a null value "
        "are never outliers."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Outliers",
        "properties": {
            "column": {"type": "string", "minLength": 1, "title": "Column", "description": "A numeric column."},
            "method": {"type": "string", "enum": ["zscore", "iqr"], "default": "zscore", "title": "Method"},
            "threshold": {
                "type": "number",
                "exclusiveMinimum": 0,
                "default": 3,
                "title": "Z-score threshold",
                "description": "zscore: how many standard deviations from the mean make an outlier.",
            },
            "k": {
                "type": "number",
                "exclusiveMinimum": 0,
                "default": 1.5,
                "title": "IQR multiplier",
                "description": "iqr: the fences are k interquartile ranges beyond the quartiles.",
            },
            "group_by": {**string_list("Group by", "Judge each row within its group.", max_items=10), "default": []},
            "only_outliers": {
                "type": "boolean",
                "default": False,
                "title": "Only outliers",
                "description": "Return only the outlying rows (else every row, flagged).",
            },
        },
        "required": ["column"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "description": "The input's columns, then score (number or null) and is_outlier (boolean).",
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        column = resolve(columns, config["column"], cfg("column"), problems, kinds=NUMERIC, expected="numeric")
        groups = group_columns(config, columns, problems)
        method = config.get("method", "zscore")
        clashes([("score", cfg("column")), ("is_outlier", cfg("column"))], problems, taken=[c.name for c in columns])
        if column is None:
            return None
        x = f"CAST({quote(column.name)} AS DOUBLE)"
        out = [*columns, Column("score", "DOUBLE"), Column("is_outlier", "BOOLEAN")]
        only = bool(config.get("only_outliers", False))

        def render(params: Params) -> str:
            window = f"OVER (PARTITION BY {', '.join(quote(g.name) for g in groups)})" if groups else "OVER ()"
            if method == "zscore":
                stats = f"avg({x}) {window} AS _mean, stddev_samp({x}) {window} AS _sd"
                score = f"CASE WHEN _sd > 0 THEN ({x} - _mean) / _sd END"
                flag = f"coalesce(abs({score}) > {params.add(float(config.get('threshold', 3)))}, false)"
            else:
                stats = f"quantile_cont({x}, 0.25) {window} AS _q1, quantile_cont({x}, 0.75) {window} AS _q3"
                k = params.add(float(config.get("k", 1.5)))
                iqr = "(_q3 - _q1)"
                score = (
                    f"CASE WHEN {x} IS NULL THEN NULL WHEN {x} > _q3 THEN ({x} - _q3) / NULLIF({iqr}, 0) "
                    f"WHEN {x} < _q1 THEN (_q1 - {x}) / NULLIF({iqr}, 0) ELSE 0.0 END"
                )
                flag = f"coalesce({x} < _q1 - {k} * {iqr} OR {x} > _q3 + {k} * {iqr}, false)"
            names = ", ".join(quote(c.name) for c in columns)
            inner = (
                f'SELECT {names}, CAST({score} AS DOUBLE) AS "score", {flag} AS "is_outlier" '
                f'FROM (SELECT *, {stats} FROM "data")'
            )
            return f'SELECT * FROM ({inner}) WHERE "is_outlier"' if only else inner

        return Plan(out, render)


# --- forecast ------------------------------------------------------------------------------------------------------

_FORECAST_AGGS: Final[Mapping[str, str]] = {"sum": "sum", "mean": "avg", "count": "count", "min": "min", "max": "max"}


class ForecastBlock(PlannedBlock):
    id: ClassVar[str] = "forecast"
    name: ClassVar[str] = "Forecast"
    category: ClassVar[str] = "time"
    description: ClassVar[str] = (
        "A simple forecast of a metric per time bucket. linear: a least-squares line through the history (by bucket "
        "index); interval ± z * the residuals' standard deviation. seasonal_naive: each future bucket repeats the "
        "bucket one season earlier; interval ± z * the standard deviation of the seasonal differences * "
        "sqrt(seasons ahead). Output: the history (kind 'history'), then the forecast (kind 'forecast')."
    )
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "title": "Forecast",
        "properties": {
            "time": {"type": "string", "minLength": 1, "title": "Time column"},
            "value": {
                "type": "string",
                "minLength": 1,
                "title": "Value column",
                "description": "A numeric column (not needed to count rows).",
            },
            "agg": {
                "type": "string",
                "enum": list(_FORECAST_AGGS),
                "default": "sum",
                "title": "Aggregate per bucket",
            },
            "bucket": {"type": "string", "enum": list(BUCKETS), "default": "day", "title": "Bucket"},
            "horizon": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 7, "title": "Buckets ahead"},
            "method": {"type": "string", "enum": ["linear", "seasonal_naive"], "default": "linear", "title": "Method"},
            "season_length": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 7,
                "title": "Season length",
                "description": "seasonal_naive: buckets per season (7 for days in a week, 24 for hours in a day).",
            },
            "z": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 10,
                "default": 1.96,
                "title": "Interval width (z)",
                "description": "1.28 for ~80 %, 1.96 for ~95 % (assuming normal errors).",
            },
        },
        "required": ["time"],
        "additionalProperties": False,
    }
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "bucket": {"type": "string", "format": "date-time"},
            "kind": {"type": "string", "enum": ["history", "forecast"]},
            "value": {"type": ["number", "null"]},
            "lower": {"type": ["number", "null"]},
            "upper": {"type": ["number", "null"]},
        },
        "required": ["bucket", "kind", "value", "lower", "upper"],
        "additionalProperties": False,
    }

    def plan(self, config: Any, inputs: Mapping[str, Columns], problems: list[Problem]) -> Plan | None:
        columns = inputs["data"]
        time_col = resolve(columns, config["time"], cfg("time"), problems, kinds=TEMPORAL, expected="temporal")
        agg = config.get("agg", "sum")
        value_col = None
        if "value" in config:
            value_col = resolve(columns, config["value"], cfg("value"), problems, kinds=NUMERIC, expected="numeric")
        elif agg != "count":
            problems.append(Problem(cfg("value"), f"{agg} needs a value column.", "INVALID_CONFIG"))
        bucket = config.get("bucket", "day")
        if time_col is not None:
            check_bucket(time_col, bucket, cfg("bucket"), problems)
        if time_col is None or problems:
            return None
        tcol, btype = time_col, bucket_type(time_col, bucket)
        out = [
            Column("bucket", btype),
            Column("kind", "VARCHAR"),
            Column("value", "DOUBLE"),
            Column("lower", "DOUBLE"),
            Column("upper", "DOUBLE"),
        ]
        method = config.get("method", "linear")

        def render(params: Params) -> str:
            arg = quote(value_col.name) if value_col is not None else "*"
            horizon = params.add(int(config.get("horizon", 7)))
            z = params.add(float(config.get("z", 1.96)))
            series = (
                f"series AS (SELECT {bucket_sql(tcol, bucket)} AS b, CAST({_FORECAST_AGGS[agg]}({arg}) AS DOUBLE) AS v "
                f'FROM "data" WHERE {quote(tcol.name)} IS NOT NULL GROUP BY 1), '
                f"indexed AS (SELECT b, v, date_diff('{bucket}', min(b) OVER (), b) AS i FROM series), "
                "last AS (SELECT max(i) AS last_i, max(b) AS last_b, min(b) AS first_b FROM indexed)"
            )
            steps = f"range(1, {horizon} + 1) AS h(h)"
            at = shift_sql("last.first_b", bucket, "last.last_i + h.h", btype)
            history = (
                'SELECT b AS "bucket", \'history\' AS "kind", v AS "value", NULL AS "lower", NULL AS "upper" '
                "FROM indexed"
            )
            if method == "linear":
                fit = (
                    "fit AS (SELECT regr_slope(v, i) AS slope, regr_intercept(v, i) AS intercept FROM indexed), "
                    "resid AS (SELECT stddev_samp(v - (fit.intercept + fit.slope * i)) AS sd FROM indexed, fit)"
                )
                predicted = "(fit.intercept + fit.slope * (last.last_i + h.h))"
                future = (
                    f'SELECT {at} AS "bucket", \'forecast\' AS "kind", {predicted} AS "value", '
                    f'{predicted} - {z} * resid.sd AS "lower", {predicted} + {z} * resid.sd AS "upper" '
                    f"FROM last, fit, resid, {steps}"
                )
            else:
                m = params.add(int(config.get("season_length", 7)))
                fit = (
                    "resid AS (SELECT stddev_samp(cur.v - prev.v) AS sd FROM indexed AS cur "
                    f"JOIN indexed AS prev ON prev.i = cur.i - {m})"
                )
                width = f"{z} * resid.sd * sqrt(CAST((h.h - 1) // {m} + 1 AS DOUBLE))"
                future = (
                    f'SELECT {at} AS "bucket", \'forecast\' AS "kind", past.v AS "value", '
                    f'past.v - {width} AS "lower", past.v + {width} AS "upper" '
                    f"FROM last CROSS JOIN resid CROSS JOIN {steps} "
                    f"LEFT JOIN indexed AS past ON past.i = last.last_i - {m} + 1 + (h.h - 1) % {m}"
                )
            return (
                f'WITH {series}, {fit} SELECT "bucket", "kind", CAST("value" AS DOUBLE) AS "value", '
                f'CAST("lower" AS DOUBLE) AS "lower", CAST("upper" AS DOUBLE) AS "upper" '
                f'FROM ({history} UNION ALL {future}) ORDER BY "bucket"'
            )

        return Plan(out, render)
