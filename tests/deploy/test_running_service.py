"""The real server, started the way the image starts it (the `mprnet-serve` console script of its
CMD, with the image's MPRNET_* environment):

- the metric names the Grafana dashboard and the autoscalers (KEDA trigger, prometheus-adapter rule
  behind the HPA) query exist in what it exports on /metrics, so a renamed metric breaks the build;
  every query must also parse as PromQL;
- the image's HEALTHCHECK command, run as written in the Dockerfile, passes against it;
- SIGTERM, the image's STOPSIGNAL, drains it and it exits 0 within its grace period.

The tests run in file order; the last one stops the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.live_server import TEST_ENV, LiveServer, free_port, tiny_weights, wait_ready

from .checks import adapter_metricsquery, dashboard_queries, dockerfile_instructions, env_pairs, exported_metrics, query_metrics
from .test_dockerfile import DOCKERFILE
from .tools import ROOT, documents, kind, kustomize, run

pytestmark = pytest.mark.slow  # starts the real server

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mprnet.json"
ADAPTER = ROOT / "k8s" / "overlays" / "hpa" / "prometheus-adapter-values.yaml"

# What the dashboard must show: request rate and latency by task, queue depth and wait,
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


def image_environment() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            env.update(env_pairs(rest))
    return env


def image_command(word: str) -> list[str]:
    """The exec-form array of the image's CMD, or of its HEALTHCHECK's CMD."""
    (args,) = [rest for w, rest in dockerfile_instructions(DOCKERFILE.read_text()) if w == word][-1:]
    return json.loads(args[args.index("CMD") + 3 :] if word == "HEALTHCHECK" else args)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> LiveServer:
    """The image's CMD with the image's MPRNET_* settings, except: loopback instead of 0.0.0.0, a
    free port, tiny CPU weights instead of /weights, and the tests' small buckets (TEST_ENV)."""
    tmp = tmp_path_factory.mktemp("image-cmd")
    port = free_port()
    image = {k: v for k, v in image_environment().items() if k.startswith("MPRNET_")}
    env = {**os.environ, **image, **TEST_ENV, "MPRNET_HOST": "127.0.0.1", "MPRNET_PORT": str(port)}
    env["MPRNET_WEIGHTS_DIR"] = str(tiny_weights(tmp / "weights"))
    cmd = image_command("CMD")
    console_script = Path(sys.executable).parent / cmd[0]  # on the image's PATH (/opt/venv/bin)
    assert console_script.is_file(), f"{cmd[0]} is not installed in this venv: run scripts/setup-dev.sh"
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(console_script), *cmd[1:]], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    live = LiveServer(f"http://127.0.0.1:{port}", port, proc, log_path)
    try:
        wait_ready(live, timeout=120)
        yield live
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def exposition(server) -> str:
    """GET /metrics of the running server."""
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


# --- the image's health check and stop signal ----------------------------------------------------


def healthcheck(port: int):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPRNET_")}
    cmd = image_command("HEALTHCHECK")
    assert cmd[0] == "python"
    return run([sys.executable, *cmd[1:]], env={**env, "MPRNET_PORT": str(port)}, timeout=30)


def test_image_healthcheck_passes(server):
    proc = healthcheck(server.port)
    assert proc.returncode == 0, proc.stdout


def test_image_healthcheck_fails_when_nothing_answers(server):
    proc = healthcheck(free_port())
    assert proc.returncode != 0


def test_sigterm_drains_and_exits_zero(server):
    """Last test of the module: the stop signal the image declares ends the server cleanly."""
    (stop,) = [rest for w, rest in dockerfile_instructions(DOCKERFILE.read_text()) if w == "STOPSIGNAL"]
    grace = float(image_environment().get("MPRNET_GRACE_PERIOD_S", TEST_ENV["MPRNET_GRACE_PERIOD_S"]))
    started = time.monotonic()
    server.proc.send_signal(getattr(signal, stop))
    code = server.proc.wait(grace + 15)
    assert code == 0, server.log()
    assert time.monotonic() - started < grace + 5
