"""k8s/components/kserve: the gpu overlay as a KServe InferenceService renders, validates offline (Kubernetes
schemas, the PodMonitor's CRD schema, KServe's own API types) and runs the same pod as the Deployment."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from . import kserve_schema
from .checks import pod_problems, shutdown_problems
from .test_kubernetes import K8S, _set, kubernetes_validate, with_components, writable_paths
from .test_kubernetes import healthcheck_start_period as start_period
from .tools import documents, kind, kustomize, node_checker, overlay_folder, run


def overlay_with_kserve(root: Path) -> Path:
    return overlay_folder(root / "gpu-kserve", K8S / "overlays" / "gpu", [K8S / "components" / "kserve"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "gpu-kserve.yaml"
    out.write_text(kustomize(overlay_with_kserve(tmp_path_factory.mktemp("overlay"))))
    return out


@pytest.fixture(scope="module")
def docs(rendered) -> list[dict]:
    return documents(rendered.read_text())


@pytest.fixture(scope="module")
def gpu_docs(tmp_path_factory) -> list[dict]:
    return documents(kustomize(K8S / "overlays" / "gpu"))


def predictor(docs: list[dict]) -> dict:
    (isvc,) = kind(docs, "InferenceService")
    return isvc["spec"]["predictor"]


def test_validates_against_kubernetes_and_the_custom_resource_schemas(rendered, docs):
    proc = kubernetes_validate(rendered)
    assert proc.returncode == 0, proc.stdout
    assert set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout)) == {"InferenceService", "PodMonitor"}
    proc = run([*node_checker(), str(rendered)])
    assert proc.returncode == 0 and "ok PodMonitor/mprnet" in proc.stdout, proc.stdout
    (isvc,) = kind(docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert kserve_schema.problems(isvc) == []


P = ["spec", "predictor"]
C0 = [*P, "containers", 0]


@pytest.mark.parametrize(
    ("breakage", "expect"),
    [
        (_set([*P, "minReplica"], 1), "minReplica: unknown field of V1beta1PredictorSpec"),
        (_set([*C0, "ports", 0, "containerPort"], "8000"), "containerPort: expected int"),
        (_set([*C0, "readinessProbe", "httpGets"], {}), "httpGets: unknown field"),
        (_set([*C0, "name"], KeyError), "containers[0]: V1Container"),
        (_set([*P, "tolerations"], {"key": "nvidia.com/gpu"}), "tolerations: expected a list"),
        (_set(["spec", "predictors"], {}), "spec.predictors: unknown field"),
    ],
)
def test_kserve_type_check_catches_a_broken_inference_service(docs, breakage, expect):
    (isvc,) = kind(docs, "InferenceService")
    broken = copy.deepcopy(isvc)
    breakage(broken)
    found = kserve_schema.problems(broken)
    assert any(expect in p for p in found), found


def test_kserve_replaces_the_deployment_service_and_service_monitor(docs, gpu_docs):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "InferenceService", "Namespace", "PodDisruptionBudget", "PodMonitor"]
    assert all(d["metadata"].get("namespace") == "mprnet" for d in docs if d["kind"] != "Namespace")
    labels = predictor(docs)["labels"]
    for selecting in (*kind(docs, "PodDisruptionBudget"), *kind(docs, "PodMonitor")):
        wanted = selecting["spec"]["selector"]["matchLabels"]
        assert wanted and all(labels.get(k) == v for k, v in wanted.items()), selecting["kind"]
    (monitor,) = kind(docs, "PodMonitor")
    ports = {p["name"] for p in predictor(docs)["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    (deploy,) = kind(gpu_docs, "Deployment")
    assert labels == deploy["spec"]["template"]["metadata"]["labels"], "pods must carry the Deployment's pod labels"


def test_the_predictor_runs_the_gpu_deployments_pod(docs, gpu_docs):
    """Same image, settings, probes, hardening, shutdown timing and GPU placement: a drift in either file fails."""
    spec = predictor(docs)
    (deploy,) = kind(gpu_docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    for key in (
        "securityContext",
        "terminationGracePeriodSeconds",
        "enableServiceLinks",
        "automountServiceAccountToken",
        "nodeSelector",
        "tolerations",
        "volumes",
    ):
        assert spec.get(key) == pod.get(key), key
    (ours,), (theirs,) = spec["containers"], pod["containers"]
    assert ours["name"] == "kserve-container"
    assert _comparable(ours) == _comparable(theirs)
    (settings,) = kind(docs, "ConfigMap")
    assert ours["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}], "settings ConfigMap not found"
    assert str(settings["data"]["MPRNET_PORT"]) == str(ours["ports"][0]["containerPort"])
    as_deployment = {"spec": {"template": {"spec": {**spec, "containers": [{**ours, "name": "mprnet"}]}}}}
    assert pod_problems(as_deployment, writable_paths(), start_period()) == []
    assert shutdown_problems(as_deployment, {k: str(v) for k, v in settings["data"].items()}) == []


def _comparable(container: dict) -> dict:
    """The container less its name, resource quantities as strings (1 and "1" are the same quantity)."""
    out = {k: v for k, v in container.items() if k != "name"}
    out["resources"] = {k: {q: str(n) for q, n in v.items()} for k, v in container.get("resources", {}).items()}
    return out


def test_components_still_render_with_the_gpu_overlay(tmp_path):
    """The other optional components patch the Deployment, which this one removes: they stay separate."""
    assert kind(documents(kustomize(with_components(tmp_path))), "Deployment")
