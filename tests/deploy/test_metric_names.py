"""The metric names the Grafana dashboard and the autoscalers (KEDA trigger, prometheus-adapter rule
behind the HPA) query exist in what the service exports: scraped from a running server, so a
renamed metric breaks the build. Every query must also parse as PromQL."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.live_server import live_server

from .checks import adapter_metricsquery, dashboard_queries, exported_metrics, query_metrics
from .tools import ROOT, documents, kind, kustomize

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mprnet.json"
ADAPTER = ROOT / "k8s" / "overlays" / "hpa" / "prometheus-adapter-values.yaml"

# What issue 5 asks the dashboard to show: request rate and latency by task, queue depth and wait,
# batch size, megapixels/s, rejections by reason, GPU memory.
DASHBOARD_MUST_USE = {
    "mprnet_requests_total",
    "mprnet_request_duration_seconds_bucket",
    "mprnet_queue_depth_requests",
    "mprnet_queue_depth_megapixels",
    "mprnet_queue_wait_seconds_bucket",
    "mprnet_queue_oldest_wait_seconds",
    "mprnet_batch_size_requests_sum",
    "mprnet_batch_size_tiles_sum",
    "mprnet_megapixels_processed_total",
    "mprnet_rejected_total",
    "mprnet_gpu_memory_allocated_bytes",
    "mprnet_gpu_memory_reserved_bytes",
}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory) -> str:
    """GET /metrics of the real server (`python -m service`, tiny weights, CPU)."""
    with live_server(tmp_path_factory.mktemp("metrics-server"), ready_timeout=120) as server:
        return server.metrics()


def metric_types(exposition: str) -> dict[str, str]:
    return {p[2]: p[3] for p in (line.split() for line in exposition.splitlines()) if len(p) == 4 and p[:2] == ["#", "TYPE"]}


def autoscaling_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of the KEDA trigger(s) and of the adapter rules behind the HPA."""
    out = []
    for so in kind(documents(kustomize(ROOT / "k8s" / "overlays" / "keda")), "ScaledObject"):
        for t in so["spec"]["triggers"]:
            assert t["type"] == "prometheus"
            out.append((f"KEDA trigger {t.get('name')}", t["metadata"]["query"]))
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        out.append((f"adapter seriesQuery {rule['name']['as']}", rule["seriesQuery"]))
        series = next(iter(query_metrics(rule["seriesQuery"])))
        out.append((f"adapter metricsQuery {rule['name']['as']}", adapter_metricsquery(rule, series)))
    return out


def unknown_metrics(queries: list[tuple[str, str]], exported: set[str]) -> list[str]:
    return [
        f"{where}: {name} is not exported by the service" for where, q in queries for name in sorted(query_metrics(q) - exported)
    ]


def counter_signals(queries: list[tuple[str, str]], types: dict[str, str]) -> list[str]:
    """An autoscaling signal must be a level (gauge): a counter only grows, whatever the load."""
    gauges = {name for name, t in types.items() if t == "gauge"}
    return [f"{where}: {name} is not a gauge" for where, q in queries for name in sorted(query_metrics(q) - gauges)]


def test_dashboard_queries_use_exported_metrics(exposition):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10
    assert unknown_metrics(queries, exported_metrics(exposition)) == []
    used = set().union(*(query_metrics(q) for _, q in queries))
    assert DASHBOARD_MUST_USE <= used, f"the dashboard shows nothing of {DASHBOARD_MUST_USE - used}"


def test_autoscaling_queries_use_exported_gauges(exposition):
    queries = autoscaling_queries()
    assert unknown_metrics(queries, exported_metrics(exposition)) == []
    assert counter_signals(queries, metric_types(exposition)) == []
    # KEDA and the HPA scale on the same signal, so either overlay behaves the same.
    keda = set().union(*(query_metrics(q) for where, q in queries if where.startswith("KEDA")))
    adapter = set().union(*(query_metrics(q) for where, q in queries if where.startswith("adapter")))
    assert keda == adapter == {"mprnet_queue_depth_megapixels"}


def test_keda_query_selects_this_deployment():
    docs = documents(kustomize(ROOT / "k8s" / "overlays" / "keda"))
    (svc,), (so,) = kind(docs, "Service"), kind(docs, "ScaledObject")
    for t in so["spec"]["triggers"]:
        q = t["metadata"]["query"]
        assert f'namespace="{svc["metadata"]["namespace"]}"' in q and f'service="{svc["metadata"]["name"]}"' in q, q


# --- the checks fail on broken queries ----------------------------------------------------------


def test_renamed_metric_in_the_dashboard_is_caught(exposition):
    broken = json.loads(DASHBOARD.read_text().replace("mprnet_queue_depth_megapixels", "mprnet_queue_megapixels"))
    problems = unknown_metrics(dashboard_queries(broken), exported_metrics(exposition))
    assert problems and "mprnet_queue_megapixels is not exported" in problems[0]


def test_renamed_metric_in_the_service_is_caught(exposition):
    renamed = exposition.replace("mprnet_rejected_total", "mprnet_rejections_total")
    problems = unknown_metrics(dashboard_queries(json.loads(DASHBOARD.read_text())), exported_metrics(renamed))
    assert any("mprnet_rejected_total" in p for p in problems), problems


def test_query_syntax_error_is_caught():
    with pytest.raises(ValueError):
        query_metrics("sum by (task (rate(mprnet_requests_total[5m]))")


def test_counter_as_autoscaling_signal_is_caught(exposition):
    queries = [("KEDA trigger", 'sum(rate(mprnet_requests_total{namespace="mprnet"}[1m]))')]
    assert unknown_metrics(queries, exported_metrics(exposition)) == []
    assert counter_signals(queries, metric_types(exposition)) == ["KEDA trigger: mprnet_requests_total is not a gauge"]
