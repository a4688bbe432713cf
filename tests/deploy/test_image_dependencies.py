"""The image's Python dependency set exists: every torch build the repository names is one PyTorch
publishes, and the default build's whole dependency set resolves against the package index for the
image's Python and platform, wheels only, the way docker/Dockerfile installs it (torch from
TORCH_INDEX_URL, then the project with the extras of its EXTRAS build argument). A missing wheel fails
here, not in a user's `docker build`. The CPU image's project half (OpenVINO included) resolves against
PyPI even where PyTorch's CPU index cannot be reached.

The resolution needs the network (`pip install --dry-run --report`, metadata only): an index that
cannot be reached from here is skipped, and the skip says which build went unchecked.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .checks import dockerfile_instructions, project_installs
from .test_compose import COMPOSE, CPU, config
from .test_dockerfile import DOCKERFILE, torch_pin
from .tools import ROOT, run

PYPI = "https://pypi.org/simple"
PYTHON_VERSION = "3.12"  # the image's base, python:3.12-slim-trixie
GLIBC_MINOR = 41  # Debian 13 (trixie) has glibc 2.41: the image runs manylinux_2_5 .. manylinux_2_41 wheels
# The builds PyTorch publishes for each release, from its release notes: torch 2.12 and 2.13 have no
# CUDA 12.8 build. A new torch pin needs its row here, checked against those notes.
PUBLISHED = {"2.13.0": {"cpu", "cu126", "cu130"}}
# Where install lines name an index: the image, the compose files, the README and the deployment guide.
NAMED_IN = [DOCKERFILE, ROOT / "docker-compose.yml", *sorted((ROOT / "docker").glob("compose.*.yml"))]
NAMED_IN += [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INDEX_URL = re.compile(r"https://(?:download\.pytorch\.org/whl/[A-Za-z0-9.]+|pypi\.org/simple)\b")


def named_indexes() -> dict[str, list[str]]:
    """Every torch wheel index the repository names: {url: [files naming it]}."""
    found: dict[str, list[str]] = {}
    for path in NAMED_IN:
        for url in INDEX_URL.findall(path.read_text()):
            found.setdefault(url, []).append(str(path.relative_to(ROOT)))
    return found


def default_index() -> str:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    return dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)["TORCH_INDEX_URL"]


def build_name(url: str) -> str:
    """cu126, cpu, ... for PyTorch's indexes; PyPI's Linux x86-64 wheel is the CUDA 13.0 build."""
    return "cu130" if url == PYPI else url.rstrip("/").rsplit("/", 1)[1]


def unpublished(urls: list[str], pin: str) -> list[str]:
    builds = PUBLISHED.get(pin)
    if builds is None:
        return [f"torch {pin} has no row in PUBLISHED: check which builds PyTorch publishes for it"]
    return [url for url in urls if build_name(url) not in builds]


def test_every_named_torch_build_is_published():
    named = named_indexes()
    assert default_index() in named, "the Dockerfile's default TORCH_INDEX_URL is not a torch index"
    bad = unpublished(sorted(named), torch_pin())
    assert bad == [], {url: named.get(url) for url in bad}


def test_published_check_catches_cu128():
    cu128 = "https://download.pytorch.org/whl/cu128"
    assert unpublished([cu128, PYPI], "2.13.0") == [cu128]
    assert "no row" in unpublished([PYPI], "9.9.9")[0]


# --- the resolution -----------------------------------------------------------------------------------


def platform_args() -> list[str]:
    """pip matches --platform tags exactly: name every manylinux tag the image's glibc runs."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(5, GLIBC_MINOR + 1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [arg for tag in tags for arg in ("--platform", tag)]


def project_requirements(with_torch: bool, extras: list[str] = ()) -> list[str]:
    """The project's dependencies, plus those of its optional groups `extras` (as `pip install .[extras]`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in extras for d in project["optional-dependencies"][extra]]
    return [d for d in deps if with_torch or not re.match(r"torch\b", d)]


def image_extras(index: str) -> list[str]:
    """The extras the image built from torch `index` installs: the EXTRAS of the compose variant (GPU, or
    CPU with docker/compose.cpu.yml) that names that index, else the Dockerfile's default, as its
    `pip install /src[...]` line expands them."""
    args = {}
    for files in ((COMPOSE,), (COMPOSE, CPU)):
        variant = config(*files)["services"]["mprnet"]["build"]["args"]
        if variant.get("TORCH_INDEX_URL") == index:
            args = variant
    (target,) = project_installs(DOCKERFILE.read_text(), args)
    extras = re.fullmatch(r"/src(?:\[(.*)\])?", target).group(1)
    return [e.strip() for e in extras.split(",")] if extras else []


def reachable(url: str) -> str | None:
    """None when the index answers, else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=15) as answer:
            answer.read(1)
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def resolve(index: str, requirements: list[str], report: Path) -> list[dict]:
    """`pip install --dry-run --report` for the image's Python and platform, wheels only, against
    `index` alone (this machine's pip configuration, local wheel folders included, is left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    cmd += ["--report", str(report)]
    # metadata through HTTP range requests where the index does not serve it on its own (no wheel download)
    cmd += ["--use-feature=fast-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    cmd += [*platform_args(), "--index-url", index, *requirements]
    proc = run(cmd, env=env, timeout=600)
    assert proc.returncode == 0, f"the image's dependency set does not resolve against {index}:\n{proc.stdout[-4000:]}"
    return json.loads(report.read_text())["install"]


@pytest.mark.slow
@pytest.mark.parametrize("index", sorted(named_indexes()), ids=build_name)
def test_image_dependency_set_resolves(index, tmp_path):
    why = reachable(index)
    if why is not None:
        build = build_name(index)
        pytest.skip(f"{index} cannot be reached from here ({why}): the {build} build's dependency set is unchecked")
    pin, extras = torch_pin(), image_extras(index)
    if index == PYPI:  # both of the Dockerfile's steps install from PyPI: one resolution is both
        installs = resolve(PYPI, project_requirements(with_torch=True, extras=extras), tmp_path / "all.json")
    else:
        installs = resolve(index, [f"torch=={pin}"], tmp_path / "torch.json")
        if reachable(PYPI) is not None:
            pytest.skip(f"{PYPI} cannot be reached from here: the project's own dependencies are unchecked")
        installs += resolve(PYPI, project_requirements(with_torch=False, extras=extras), tmp_path / "project.json")
    versions = installed_versions(installs)
    assert versions["torch"].split("+")[0] == pin
    wanted = requirement_names(project_requirements(with_torch=True, extras=extras))
    assert wanted <= set(versions), wanted - set(versions)
    if index == PYPI:  # the GPU image: torch runs the GPU, the OpenVINO engine stays out
        assert "openvino" not in versions, extras


@pytest.mark.slow
def test_cpu_image_installs_openvino(tmp_path):
    """The CPU image's second step (the project and its extras over the CPU build of torch) resolves
    against PyPI with the OpenVINO engine in it. Only torch comes from PyTorch's CPU index, which
    test_image_dependency_set_resolves resolves where it can be reached."""
    cpu_index = config(COMPOSE, CPU)["services"]["mprnet"]["build"]["args"]["TORCH_INDEX_URL"]
    extras = image_extras(cpu_index)
    assert "openvino" in extras, f"the CPU image installs the extras {extras}, without the OpenVINO engine"
    why = reachable(PYPI)
    if why is not None:
        pytest.skip(f"{PYPI} cannot be reached from here ({why}): the CPU image's project dependencies are unchecked")
    requirements = project_requirements(with_torch=False, extras=extras)
    versions = installed_versions(resolve(PYPI, requirements, tmp_path / "cpu.json"))
    assert "torch" not in versions, "pip would replace the CPU build of torch with PyPI's"
    assert {"openvino", "onnx"} | requirement_names(requirements) <= set(versions), versions


def installed_versions(installs: list[dict]) -> dict[str, str]:
    """{name: version} of a pip report's installs, which must all be wheels."""
    assert all(i["download_info"]["url"].endswith(".whl") for i in installs)
    return {normalized(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow
def test_resolution_fails_on_a_missing_wheel(tmp_path, monkeypatch):
    """The same resolution for a glibc older than torch's wheel needs (manylinux_2_28): pip must
    fail, and so must the test."""
    why = reachable(PYPI)
    if why is not None:
        pytest.skip(f"{PYPI} cannot be reached from here ({why})")
    monkeypatch.setattr(sys.modules[__name__], "GLIBC_MINOR", 27)
    with pytest.raises(AssertionError, match="(?s)does not resolve.*No matching distribution found for torch=="):
        resolve(PYPI, [f"torch=={torch_pin()}"], tmp_path / "r.json")
