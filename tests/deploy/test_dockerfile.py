"""docker/Dockerfile: hadolint-clean, and the container contract (signals, user, health check, GPU)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from service.settings import Settings

from .checks import dockerfile_instructions, dockerfile_problems, dockerignore_excluded, env_pairs, stage_env
from .tools import ROOT, binary, broken_copy, run

DOCKERFILE = ROOT / "docker" / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"torch\s*==", d)]
    return pin.split("==", 1)[1].strip()


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return run([binary("hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG), str(path)])


def test_hadolint_passes():
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ('CMD ["mprnet-serve"]', "CMD mprnet-serve", "DL3025"),  # shell form: SIGTERM goes to sh
        ("HEALTHCHECK ", "HEALTHCHEK ", "unexpected"),  # misspelt instruction: a parse error
        ('licenses="Apache-2.0"', 'licenses="Apache 2"', "DL3054"),  # label schema (.hadolint.yaml)
        ('"torch==${TORCH_VERSION}"', "torch", "DL3013"),  # unpinned pip install
    ],
)
def test_hadolint_rejects_a_broken_dockerfile(tmp_path, old, new, expect):
    proc = hadolint(broken_copy(DOCKERFILE, tmp_path / "Dockerfile", old, new))
    assert proc.returncode != 0 and expect in proc.stdout, proc.stdout


def test_container_contract():
    assert dockerfile_problems(DOCKERFILE.read_text(), torch_pin()) == []


@pytest.mark.parametrize(
    "old, new, expect",
    [
        ('CMD ["mprnet-serve"]', 'CMD ["sh", "-c", "mprnet-serve"]', "CMD must be the exec form"),
        ("USER 10001:10001", "USER mprnet", "numeric"),
        ("USER 10001:10001", "USER 0", "numeric"),
        ("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0", "differs from pyproject"),
        ("NVIDIA_DRIVER_CAPABILITIES=compute,utility", "NVIDIA_DRIVER_CAPABILITIES=utility", "compute,utility"),
        ("MPRNET_HOST=0.0.0.0", "MPRNET_HOST=127.0.0.1", "MPRNET_HOST"),
        ("/livez", "/readyz", "HEALTHCHECK"),
        ('CMD ["python", "-c"', 'CMD ["curl", "-c"', "HEALTHCHECK"),
        ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL"),
        ("ARG NVIDIA_VISIBLE_DEVICES=all", "ARG NVIDIA_VISIBLE_DEVICES=void", "NVIDIA_VISIBLE_DEVICES=all"),
        ("NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES}", "NVIDIA_VISIBLE_DEVICES=all", "build argument"),
        ("gcc g++ libc6-dev", "libc6-dev", "C and C++ compiler"),
        ("gcc g++ libc6-dev", "gcc libc6-dev", "C and C++ compiler"),
        ("ARG EXTRAS=\n", "ARG EXTRAS=openvino\n", "without extras"),  # OpenVINO in the GPU image
        ('"/src${EXTRAS:+[$EXTRAS]}"', "/src", "EXTRAS build argument"),  # the argument never reaches pip
        ('"/src${EXTRAS:+[$EXTRAS]}"', '"/src[${EXTRA}]"', "EXTRAS build argument"),  # misspelt
    ],
)
def test_container_contract_catches_a_broken_dockerfile(old, new, expect):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new, 1), torch_pin())
    assert any(expect in p for p in problems), problems


def test_compile_threads_cap_is_what_inductor_reads():
    """The image caps inductor's compile workers by a variable inductor really reads."""
    value = stage_env(DOCKERFILE.read_text())["TORCHINDUCTOR_COMPILE_THREADS"]
    assert int(value) >= 1
    code = "import torch._inductor.config as c; print(c.compile_threads)"
    proc = run([sys.executable, "-c", code], env={**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": value}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == value, proc.stdout


def test_settings_in_the_image_are_real_settings():
    """extra="ignore" would silently drop a misspelt MPRNET_ variable: check every one by name."""
    env = {}
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            env.update(env_pairs(rest))
    ours = {k for k in env if k.startswith("MPRNET_")}
    assert ours and ours <= settings_env_names(), ours - settings_env_names()


def test_cache_settings_point_at_the_writable_cache():
    """Any *_CACHE_DIR setting (e.g. torch.compile's) must be set to the cache volume: elsewhere the
    read-only root filesystem would refuse the write."""
    env = {}
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            env.update(env_pairs(rest))
    for name in sorted(n for n in settings_env_names() if n.endswith("CACHE_DIR")):
        assert env.get(name, "").startswith(env["XDG_CACHE_HOME"] + "/"), f"set {name} under {env['XDG_CACHE_HOME']} in the image"


def settings_env_names() -> set[str]:
    """The variables the service reads (service/settings.py)."""
    return {"MPRNET_" + name.upper() for name in Settings.model_fields}


def test_start_command_is_the_service_entry_point():
    """The image runs `mprnet-serve`, the console script for the module the tests start."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mprnet-serve"] == "service.__main__:main"


# --- .dockerignore --------------------------------------------------------------------------------

NEEDED = [
    "pyproject.toml",
    "README.md",
    "model/__init__.py",
    "model/weights/denoise.safetensors",
    "service/__init__.py",
    "service/static/index.html",
]
LEFT_OUT = [
    ".git/HEAD",
    ".venv/bin/python",
    "tests/deploy/test_dockerfile.py",
    "tests/tools/node_modules/yaml/package.json",
    "runs/x/ckpt.pt",
    "service/__pycache__/x.pyc",
    "docker/Dockerfile",
]


def test_dockerignore_keeps_what_the_build_copies():
    rules = (ROOT / ".dockerignore").read_text()
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert not dockerignore_excluded(rules, src.rstrip("/")), f"COPY {src}: excluded by .dockerignore"
    assert [p for p in NEEDED if dockerignore_excluded(rules, p)] == []
    assert [p for p in LEFT_OUT if not dockerignore_excluded(rules, p)] == []


def test_dockerignore_check_catches_excluded_weights():
    rules = (ROOT / ".dockerignore").read_text() + "\nmodel/weights\n"
    assert dockerignore_excluded(rules, "model/weights/denoise.safetensors")
    assert not dockerignore_excluded(rules, "model/__init__.py")


# --- what the image's `pip install /src` puts in it -----------------------------------------------


def build_context(dest: Path) -> Path:
    """The Docker build context: the repository's files (tracked or new, not git-ignored) minus what
    .dockerignore leaves out. Without weights in the repository yet, one placeholder stands in."""
    rules = (ROOT / ".dockerignore").read_text()
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"]).stdout.splitlines()
    weights = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "model" / "weights").glob("*.safetensors"))
    for rel in sorted(set(listed) | set(weights)):
        if (ROOT / rel).is_file() and not dockerignore_excluded(rules, rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    if not list((dest / "model" / "weights").glob("*.safetensors")):
        (dest / "model" / "weights").mkdir(parents=True, exist_ok=True)
        (dest / "model" / "weights" / "placeholder.safetensors").write_bytes(b"\0")
    return dest


def wheel_files(context: Path, out: Path) -> set[str]:
    """The files of the wheel pip builds from `context`, as the image's `pip install /src` does."""
    proc = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(context)],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    (wheel,) = out.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_image_install_bakes_in_the_bundled_weights(tmp_path):
    context = build_context(tmp_path / "context")
    files = wheel_files(context, tmp_path / "wheel")
    weights = {f"model/weights/{p.name}" for p in (context / "model" / "weights").glob("*.safetensors")}
    assert weights and weights <= files, f"not in the image: {weights - files}"
    assert {"service/__main__.py", "service/static/index.html", "model/arch.py"} <= files


def test_weights_check_catches_missing_package_data(tmp_path):
    context = build_context(tmp_path / "context")
    pyproject = context / "pyproject.toml"
    text = pyproject.read_text()
    assert '"weights/*.safetensors", ' in text
    pyproject.write_text(text.replace('"weights/*.safetensors", ', "", 1))
    files = wheel_files(context, tmp_path / "wheel")
    assert not any(f.startswith("model/weights/") and f.endswith(".safetensors") for f in files)
