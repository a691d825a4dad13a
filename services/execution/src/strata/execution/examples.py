"""``GET /queries/examples``: queries that run as they are on the demo datasets (``make run`` loads them)."""

from __future__ import annotations

from .schemas import ExampleQuery

EXAMPLES: tuple[ExampleQuery, ...] = (
    ExampleQuery(
        title="Calls and ratings by region",
        description="Volume, average handling time and rating per region (support_calls, DuckDB).",
        engine="duckdb",
        sql="SELECT region, count(*) AS calls, round(avg(duration_s)) AS avg_duration_s,\n"
        "       round(avg(rating), 2) AS avg_rating\nFROM support_calls\nGROUP BY region\nORDER BY calls DESC",
    ),
    ExampleQuery(
        title="Agent leaderboard",
        description="Agents with at least $min_calls calls, ranked by average rating (a bound parameter).",
        engine="duckdb",
        sql="SELECT agent, count(*) AS calls, round(avg(rating), 2) AS avg_rating,\n"
        "       round(avg(resolved::INT) * 100, 1) AS resolved_pct\nFROM support_calls\nGROUP BY agent\n"
        "HAVING count(*) >= $min_calls\nORDER BY avg_rating DESC, calls DESC\nLIMIT 10",
        parameters={"min_calls": 100},
    ),
    ExampleQuery(
        title="Daily calls by issue type",
        description="A time series per issue type, ready for a chart (support_calls, DuckDB).",
        engine="duckdb",
        sql="SELECT date_trunc('day', start_time) AS day, issue_type, count(*) AS calls\n"
        "FROM support_calls\nGROUP BY ALL\nORDER BY day, issue_type",
    ),
    ExampleQuery(
        title="Taxi revenue by hour of day",
        description="A GROUP BY over the 1M-row taxi_trips dataset (DuckDB).",
        engine="duckdb",
        sql="SELECT hour(pickup_at) AS hour, count(*) AS trips, round(sum(fare + tip), 2) AS revenue,\n"
        "       round(avg(tip / nullif(fare, 0)) * 100, 1) AS tip_pct\nFROM taxi_trips\nGROUP BY hour\nORDER BY hour",
    ),
    ExampleQuery(
        title="Busiest pickup zones (ClickHouse)",
        description="The same data through the ClickHouse engine (embedded chdb, or your cluster).",
        engine="clickhouse",
        sql="SELECT pickup_zone, count() AS trips, round(avg(distance_km), 2) AS avg_km,\n"
        "       quantile(0.9)(fare) AS fare_p90\nFROM taxi_trips\nGROUP BY pickup_zone\nORDER BY trips DESC\nLIMIT 10",
    ),
    ExampleQuery(
        title="Payment mix for long trips (ClickHouse, parameter)",
        description="A bound ClickHouse parameter: trips longer than {min_km:Float64} km by payment type.",
        engine="clickhouse",
        sql="SELECT payment_type, count() AS trips, round(avg(tip), 2) AS avg_tip\nFROM taxi_trips\n"
        "WHERE distance_km > {min_km:Float64}\nGROUP BY payment_type\nORDER BY trips DESC",
        parameters={"min_km": 10},
    ),
)
