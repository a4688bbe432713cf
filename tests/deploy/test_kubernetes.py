"""k8s/: every overlay renders with `kubectl kustomize`, validates strictly against the Kubernetes
schemas (kubernetes-validate) and the custom-resource schemas (npm packages, tests/tools), and
keeps the deployment rules: GPU limit only where there is a GPU, one autoscaler per Deployment,
probes and shutdown timing, hardened pod, settings the service accepts."""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.settings import Settings

from .checks import (
    autoscaler_problems,
    compile_threads_problems,
    dockerfile_instructions,
    gpu_limits,
    pod_problems,
    settings_of,
    shutdown_problems,
    stage_env,
)
from .test_dockerfile import DOCKERFILE, settings_env_names
from .tools import KUBERNETES_VERSION, ROOT, binary, documents, kind, kustomize, node_checker, overlay_folder, run

K8S = ROOT / "k8s"
OVERLAYS = ["gpu", "keda", "hpa", "cpu"]
NAMESPACE = "mprnet"
NEWEST = "1.37.0"  # the newest schema kubernetes-validate ships: catches an API removed since 1.30
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor"}  # validated by tests/tools/validate-crds.mjs
COMPONENTS = ["nvidia-runtime-class", "user-weights", "gpu-feature-discovery", "compile-cache"]


def with_components(root: Path) -> Path:
    """An overlay of gpu plus the optional components, so they are rendered and validated too."""
    components = [K8S / "components" / name for name in COMPONENTS]
    return overlay_folder(root / "gpu-with-components", K8S / "overlays" / "gpu", components)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each overlay rendered once, to a file: {name: path}."""
    out = tmp_path_factory.mktemp("rendered")
    paths = {name: K8S / "overlays" / name for name in OVERLAYS}
    paths["gpu+components"] = with_components(tmp_path_factory.mktemp("overlay"))
    files = {}
    for name, path in paths.items():
        files[name] = out / f"{name}.yaml"
        files[name].write_text(kustomize(path))
    return files


def docs_of(rendered, name) -> list[dict]:
    return documents(rendered[name].read_text())


def kubernetes_validate(path: Path, version: str = KUBERNETES_VERSION):
    return run([binary("kubernetes-validate"), "--strict", "-k", version, str(path)])


# --- the tools accept every overlay ---------------------------------------------------------------


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, NEWEST])
@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu+components"])
def test_overlay_validates_strictly(rendered, overlay, version):
    proc = kubernetes_validate(rendered[overlay], version)
    assert proc.returncode == 0, proc.stdout
    # kubernetes-validate only warns on a kind it has no schema for: each must be one the npm check covers.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout))
    assert unknown <= CUSTOM_KINDS, f"kinds validated by nothing: {unknown - CUSTOM_KINDS}"
    passed = len(re.findall(r" passed for resource ", proc.stdout))
    assert passed + len(re.findall(r"Couldn't find schema", proc.stdout)) == len(docs_of(rendered, overlay))


def test_custom_resources_validate_against_their_schemas(rendered):
    proc = run([*node_checker(), *map(str, rendered.values())])
    assert proc.returncode == 0, proc.stdout
    expected = sum(1 for name in rendered for d in docs_of(rendered, name) if d["kind"] in CUSTOM_KINDS)
    assert len(re.findall(r"^ok ", proc.stdout, re.MULTILINE)) == expected >= 4, proc.stdout


# --- ... and reject broken files --------------------------------------------------------------


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    """A scratch copy of k8s/ to break."""
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path / "k8s"


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "file, old, new, expect",
    [
        ("base/deployment.yaml", "readinessProbe:", "readinesProbe:", "readinesProbe"),  # misspelt field
        ("base/deployment.yaml", "containerPort: 8000", 'containerPort: "8000"', "containerPort"),  # wrong type
        ("base/service.yaml", "targetPort: http", "targetPorts: http", "targetPorts"),
        ("overlays/hpa/hpa.yaml", "averageValue:", "averageValu:", "averageValu"),
    ],
)
def test_kubernetes_validate_rejects_a_broken_manifest(k8s_copy, tmp_path, file, old, new, expect):
    replace_in(k8s_copy / file, old, new)
    out = tmp_path / "out.yaml"
    out.write_text(kustomize(k8s_copy / "overlays" / ("hpa" if "hpa" in file else "gpu")))
    proc = kubernetes_validate(out)
    assert proc.returncode != 0 and expect in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "file, old, new",
    [
        ("base/kustomization.yaml", "resources:", "resource:"),  # misspelt kustomization field
        ("overlays/cpu/no-gpu.yaml", "  name: mprnet", "  name: mprnett"),  # patch matches nothing
        ("overlays/keda/kustomization.yaml", "path: /spec/replicas", "path: /spec/replica"),  # JSON patch on a missing path
    ],
)
def test_kustomize_rejects_a_broken_kustomization(k8s_copy, file, old, new):
    replace_in(k8s_copy / file, old, new)
    overlay = file.split("/")[1] if file.startswith("overlays") else "gpu"
    proc = run([binary("kubectl"), "kustomize", str(k8s_copy / "overlays" / overlay)])
    assert proc.returncode != 0, proc.stdout


BROKEN_CUSTOM_RESOURCES = [
    ("overlays/keda/scaledobject.yaml", "cooldownPeriod:", "cooldownPeriods:", "cooldownPeriods"),  # misspelt optional field
    ("overlays/keda/scaledobject.yaml", "minReplicaCount: 1", 'minReplicaCount: "1"', "minReplicaCount"),  # wrong type
    ("overlays/keda/scaledobject.yaml", "  triggers:", "  trigger:", "trigger"),  # misspelt required field
    ("base/servicemonitor.yaml", "      interval: 15s", "      intervall: 15s", "intervall"),
    ("base/servicemonitor.yaml", "      path: /metrics", "      path: /metrics\n      scheme: htp", "allowed values"),  # bad enum
]


@pytest.fixture(scope="module")
def broken_custom_resources(tmp_path_factory) -> str:
    """One run of the checker over every broken copy (a TypeScript compile per run costs seconds)."""
    folder = tmp_path_factory.mktemp("broken-crs")
    files = []
    for i, (file, old, new, _) in enumerate(BROKEN_CUSTOM_RESOURCES):
        text = (K8S / file).read_text()
        assert old in text, f"{old!r} not in {file}"
        files.append(folder / f"case{i}.yaml")
        files[-1].write_text(text.replace(old, new, 1))
    proc = run([*node_checker(), *map(str, files)])
    assert proc.returncode == 1, proc.stdout
    return proc.stdout


@pytest.mark.parametrize("case", range(len(BROKEN_CUSTOM_RESOURCES)), ids=[c[3] for c in BROKEN_CUSTOM_RESOURCES])
def test_custom_resource_check_rejects_a_broken_file(broken_custom_resources, case):
    expect = BROKEN_CUSTOM_RESOURCES[case][3]
    (line,) = [line for line in broken_custom_resources.splitlines() if f"case{case}.yaml)" in line]
    assert line.startswith("error ") and expect in line, line


# --- the rules of the deployment ------------------------------------------------------------------


def test_gpu_limit_everywhere_but_cpu(rendered):
    for overlay in ("gpu", "keda", "hpa", "gpu+components"):
        assert gpu_limits(docs_of(rendered, overlay)) == [1], overlay
    assert gpu_limits(docs_of(rendered, "cpu")) == [None]
    (deploy,) = kind(docs_of(rendered, "cpu"), "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu"), "the CUDA image on a CPU node"
    assert "nvidia.com" not in rendered["cpu"].read_text()
    assert kind(docs_of(rendered, "cpu"), "ServiceMonitor") == [], "a laptop cluster has no prometheus-operator CRDs"


def test_gpu_limit_check_catches_a_cpu_overlay_that_keeps_it(k8s_copy):
    replace_in(k8s_copy / "overlays/cpu/no-gpu.yaml", "              nvidia.com/gpu: null\n", "")
    assert gpu_limits(documents(kustomize(k8s_copy / "overlays/cpu"))) == [1]


def test_gpu_overlay_schedules_on_gpu_nodes(rendered):
    """The GPU limit picks GPU nodes with the plain device plugin too; a node label that only GPU
    Feature Discovery sets would keep the pod Pending elsewhere, so it is an optional component."""
    for overlay in ("gpu", "keda", "hpa"):
        (deploy,) = kind(docs_of(rendered, overlay), "Deployment")
        pod = deploy["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert not pod.get("nodeSelector") and not pod.get("affinity"), f"{overlay} needs node labels some clusters lack"
    (deploy,) = kind(docs_of(rendered, "gpu+components"), "Deployment")
    assert deploy["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert deploy["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_compile_cache_component_shares_a_claim(rendered):
    docs = docs_of(rendered, "gpu+components")
    (deploy,), (claim,) = kind(docs, "Deployment"), kind(docs, "PersistentVolumeClaim")
    pod = deploy["spec"]["template"]["spec"]
    (cache,) = [v for v in pod["volumes"] if v["name"] == "cache"]
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas on several nodes share the cache"
    (c,) = pod["containers"]
    assert {"name": "cache", "mountPath": stage_env(DOCKERFILE.read_text())["XDG_CACHE_HOME"]} in c["volumeMounts"]
    assert settings_of(docs)["MPRNET_COMPILE"] == "default"
    assert deploy["spec"]["progressDeadlineSeconds"] >= 3600, "a cold first compile outlasts the default 600 s"
    for overlay in OVERLAYS:
        assert kind(docs_of(rendered, overlay), "PersistentVolumeClaim") == []


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu+components"])
def test_compile_threads_are_capped(rendered, overlay):
    (deploy,) = kind(docs_of(rendered, overlay), "Deployment")
    assert compile_threads_problems(deploy) == []


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda env: [e for e in env if e["name"] != "TORCHINDUCTOR_COMPILE_THREADS"], "not set"),
        (lambda env: [{**e, "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}} for e in env], "does not set"),
        (lambda env: [{**e, "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}} for e in env],
         "divisor"),
        (lambda env: [{"name": e["name"], "value": "64"} for e in env], "within the CPU request"),
    ],
    ids=["missing", "unset-limit", "millicores", "too-many"],
)
def test_compile_threads_check_catches_a_bad_cap(rendered, change, expect):
    (deploy,) = kind(docs_of(rendered, "gpu"), "Deployment")
    broken = copy.deepcopy(deploy)
    env = broken["spec"]["template"]["spec"]["containers"][0]["env"]
    named = [e for e in env if e["name"] == "TORCHINDUCTOR_COMPILE_THREADS"]
    others = [e for e in env if e["name"] != "TORCHINDUCTOR_COMPILE_THREADS"]
    broken["spec"]["template"]["spec"]["containers"][0]["env"] = others + change(named)
    problems = compile_threads_problems(broken)
    assert problems and expect in problems[0], problems


@pytest.mark.parametrize(
    "overlay, autoscaler", [("gpu", None), ("cpu", None), ("keda", "ScaledObject"), ("hpa", "HorizontalPodAutoscaler")]
)
def test_one_autoscaler_per_deployment(rendered, overlay, autoscaler):
    docs = docs_of(rendered, overlay)
    assert autoscaler_problems(docs) == []
    scalers = [d["kind"] for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    assert scalers == ([autoscaler] if autoscaler else [])
    (deploy,) = kind(docs, "Deployment")
    # An autoscaled Deployment leaves replicas to the autoscaler: a fixed count would reset it on apply.
    assert ("replicas" in deploy["spec"]) == (autoscaler is None)
    for scaler in kind(docs, autoscaler or "-"):
        assert scaler["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]


def test_keda_and_hpa_together_are_caught(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(K8S / "overlays/hpa/hpa.yaml", both / "hpa.yaml")
    (both / "kustomization.yaml").write_text(f"resources: [{os.path.relpath(K8S / 'overlays/keda', both)}, hpa.yaml]\n")
    problems = autoscaler_problems(documents(kustomize(both)))
    assert problems and "2 autoscalers" in problems[0]


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu+components"])
def test_everything_in_one_namespace(rendered, overlay):
    for d in docs_of(rendered, overlay):
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_namespace_check_catches_an_overlay_without_it(k8s_copy):
    replace_in(k8s_copy / "overlays/keda/kustomization.yaml", "namespace: mprnet", "")
    (so,) = kind(documents(kustomize(k8s_copy / "overlays/keda")), "ScaledObject")
    assert so["metadata"].get("namespace") != NAMESPACE


def healthcheck_start_period() -> float:
    (check,) = [rest for word, rest in dockerfile_instructions(DOCKERFILE.read_text()) if word == "HEALTHCHECK"]
    return float(re.search(r"--start-period=(\d+)s", check).group(1))


def writable_paths() -> list[str]:
    env = stage_env(DOCKERFILE.read_text())
    return ["/tmp", env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"], env["CUDA_CACHE_PATH"], env["XDG_CACHE_HOME"]]


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu+components"])
def test_pod_probes_security_and_shutdown(rendered, overlay):
    docs = docs_of(rendered, overlay)
    (deploy,) = kind(docs, "Deployment")
    assert pod_problems(deploy, writable_paths(), healthcheck_start_period()) == []
    assert shutdown_problems(deploy, settings_of(docs)) == []


def _set(path: list, value):
    def apply(deploy):
        node = deploy
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return apply


POD = ["spec", "template", "spec"]
C0 = [*POD, "containers", 0]


@pytest.mark.parametrize(
    "breakage, expect",
    [
        (_set([*POD, "terminationGracePeriodSeconds"], 30), "terminationGracePeriodSeconds"),
        (_set([*C0, "lifecycle"], KeyError), "preStop"),
        (_set([*C0, "readinessProbe", "httpGet", "path"], "/livez"), "readinessProbe"),
        (_set([*C0, "livenessProbe", "httpGet", "port"], "metrics"), "livenessProbe port"),
        (_set([*C0, "startupProbe", "failureThreshold"], 6), "startupProbe allows"),
        (_set([*C0, "securityContext", "readOnlyRootFilesystem"], False), "writable"),
        (_set([*POD, "securityContext", "runAsUser"], 0), "uid 0"),
        (_set([*POD, "enableServiceLinks"], True), "enableServiceLinks"),
        (_set([*C0, "volumeMounts"], [{"name": "tmp", "mountPath": "/tmp"}]), "/var/cache/mprnet"),
    ],
)
def test_pod_checks_catch_a_broken_deployment(rendered, breakage, expect):
    docs = docs_of(rendered, "gpu")
    (deploy,) = kind(docs, "Deployment")
    broken = copy.deepcopy(deploy)
    breakage(broken)
    problems = pod_problems(broken, writable_paths(), healthcheck_start_period()) + shutdown_problems(broken, settings_of(docs))
    assert any(expect in p for p in problems), problems


def settings_problems(env: dict[str, str]) -> list[str]:
    """Names the service does not read (it ignores them silently), and values it would refuse."""
    unknown = sorted(set(env) - settings_env_names())
    if unknown:
        return [f"not a setting of the service: {', '.join(unknown)}"]
    try:
        Settings(**{k.removeprefix("MPRNET_").lower(): v for k, v in env.items()})
    except ValidationError as err:
        return [str(err)]
    return []


@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu+components"])
def test_configmap_settings_are_accepted_by_the_service(rendered, overlay):
    settings = settings_of(docs_of(rendered, overlay))
    assert settings_problems(settings) == []
    assert settings["MPRNET_HOST"] == "0.0.0.0"
    assert settings["MPRNET_DEVICE"] == ("cpu" if overlay == "cpu" else "cuda")


@pytest.mark.parametrize(
    "key, value, expect",
    [("MPRNET_PRECISON", "fp16", "not a setting"), ("MPRNET_DEVICE", "gpu", "cuda"), ("MPRNET_TASKS", "deblur,dehaze", "dehaze")],
)
def test_settings_check_catches_a_bad_configmap(rendered, key, value, expect):
    settings = {**settings_of(docs_of(rendered, "gpu")), key: value}
    problems = settings_problems(settings)
    assert problems and expect in problems[0], problems


def test_service_monitor_scrapes_the_service(rendered):
    docs = docs_of(rendered, "gpu")
    (svc,), (sm,) = kind(docs, "Service"), kind(docs, "ServiceMonitor")
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    assert all(e.get("path", "/metrics") == "/metrics" for e in sm["spec"]["endpoints"])


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered):
    (hpa,) = kind(docs_of(rendered, "hpa"), "HorizontalPodAutoscaler")
    values = yaml.safe_load((K8S / "overlays/hpa/prometheus-adapter-values.yaml").read_text())
    served = {r["name"]["as"] for r in values["rules"]["custom"]}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= served, f"no adapter rule serves {wanted - served}"
