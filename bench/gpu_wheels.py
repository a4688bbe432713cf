"""The wheels a bench/gpu.sh run needs on a lent GPU machine, which reaches no network: the dependency
closure of what the run imports (the service's dependencies, the load benchmark's client, the
reference implementation) for that machine's Python (CPython 3.12, manylinux x86-64), less what its
image already holds (bench/gpu-machine.txt). Run it here, where pip reaches the index:

    .venv/bin/python -m bench.gpu_wheels           # -> .whl/: the wheels, requirements.txt, fetched.txt
    .venv/bin/python -m bench.gpu_wheels --list    # what it would fetch, and why; nothing downloaded
    .venv/bin/python -m bench.gpu_wheels --image-part  # what the closure takes from the image instead

The closure is resolved with the image's known versions (torch 2.11, numpy, ...) and, for everything
else, this checkout's .venv versions (the ones the tests ran with). A package the image holds is
fetched too when something fetched, or the run itself, asks for a version range and the image's
version is unknown or outside it (pydantic needs a recent typing-extensions, say). On the machine
bench/gpu.sh then lets pip install, from .whl alone, whatever the image does not already satisfy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MACHINE = ROOT / "bench" / "gpu-machine.txt"
PYTHON_VERSION = "3.12"
# python3 there is 3.12.3, Ubuntu 24.04's (glibc 2.39); wheels up to manylinux_2_35 leave a margin
GLIBC_MINOR = 35
# the reference implementation (bench/reference.py) and the load benchmark's client
EXTRA_NEEDS = ("spandrel", "spandrel-extra-arches", "httpx")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE) -> dict[str, str | None]:
    """{name: version or None where unknown} from the machine's package list."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def run_requirements() -> list[str]:
    """What the GPU run installs: the service's dependencies (torch is the machine's own), the
    client extra and the reference implementation, as pyproject.toml states them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pool = [*project["dependencies"], *(r for reqs in project["optional-dependencies"].values() for r in reqs)]
    chosen = [r for r in project["dependencies"] if canonical(Requirement(r).name) != "torch"]
    for need in EXTRA_NEEDS:
        (spec,) = [r for r in pool if canonical(Requirement(r).name) == need]
        chosen.append(spec)
    return chosen


def constraints(machine: dict[str, str | None], tested: dict[str, str]) -> list[str]:
    """The machine's known versions, and the tested (.venv) version of everything the machine lacks."""
    pins = [f"{name}=={version}" for name, version in sorted(machine.items()) if version]
    pins += [f"{name}=={version}" for name, version in sorted(tested.items()) if name not in machine]
    return pins


def venv_versions() -> dict[str, str]:
    """{name: version} of this interpreter's installed distributions (the tested versions), less
    local builds (torch 2.13.0+cpu) and editable projects."""
    out = {}
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and "+" not in version and not (dist.read_text("direct_url.json") or "").strip():
            out[canonical(name)] = version
    return out


def platform_args() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(5, GLIBC_MINOR + 1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return [a for tag in tags for a in ("--platform", tag)]


def target_args() -> list[str]:
    return ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", *platform_args()]


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    requires: tuple[str, ...]  # Requires-Dist lines


def resolve(requirements: list[str], pins: list[str]) -> list[Package]:
    """The closure for the machine's Python, from pip's resolver (`--dry-run --report`: metadata
    only; HTTP range requests where the index serves no separate metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        report, constraint_file = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        constraint_file.write_text("\n".join(pins) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), "--use-feature=fast-deps", *target_args()]
        cmd += ["-c", str(constraint_file), *requirements]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            why = proc.stdout[-3000:]
            raise SystemExit(f"gpu_wheels: the closure does not resolve for CPython {PYTHON_VERSION}:\n{why}")
        installs = json.loads(report.read_text())["install"]
    metadata = [i["metadata"] for i in installs]
    return [Package(canonical(m["name"]), m["version"], tuple(m.get("requires_dist") or ())) for m in metadata]


MARKER_ENV = {
    "python_version": PYTHON_VERSION,
    "python_full_version": PYTHON_VERSION + ".3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def _applies(req: Requirement, extras: Iterable[str]) -> bool:
    marker: Marker | None = req.marker
    if marker is None:
        return True
    return any(marker.evaluate({**MARKER_ENV, "extra": e}) for e in ("", *extras))


def to_fetch(
    closure: list[Package], top_level: list[str], machine: dict[str, str | None]
) -> dict[str, tuple[str, str]]:
    """{name: (version, why)} of the closure's packages the machine must be sent.

    Everything the machine lacks; and a package the machine has, when a requirement from the run
    itself or from a package being sent names a version range that the machine's version is not
    known to meet. Requirements among the machine's own packages are its own business (its torch
    pins its CUDA libraries, which it holds)."""
    by_name = {p.name: p for p in closure}
    asked: dict[str, set[str]] = {}  # extras asked of each package, by anyone
    for line in [*top_level, *(r for p in closure for r in p.requires)]:
        req = Requirement(line)
        asked.setdefault(canonical(req.name), set()).update(req.extras)
    sent = {p.name: (p.version, "not in the machine's image") for p in closure if p.name not in machine}
    changed = True
    while changed:
        changed = False
        askers = [("the run", list(top_level))] + [(n, list(by_name[n].requires)) for n in sent if n in by_name]
        for who, lines in askers:
            extras = asked.get(who, set())
            for line in lines:
                req = Requirement(line)
                name = canonical(req.name)
                if name in sent or name not in by_name or not _applies(req, extras) or not str(req.specifier):
                    continue
                have = machine.get(name)
                if have is not None and req.specifier.contains(have, prereleases=True):
                    continue
                why = f"{who} needs {name}{req.specifier}; the machine's version is {have or 'unknown'}"
                sent[name] = (by_name[name].version, why)
                changed = True
    return dict(sorted(sent.items()))


def download(pins: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *target_args(), "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--list", action="store_true", help="print what would be fetched and why; download nothing")
    ap.add_argument(
        "--image-part",
        action="store_true",
        help="print, as name==version, the closure's packages taken from the image instead (bench/check-gpu-setup.sh)",
    )
    args = ap.parse_args(argv)
    machine = machine_packages()
    top = run_requirements()
    closure = resolve(top, constraints(machine, venv_versions()))
    fetch = to_fetch(closure, top, machine)
    if args.image_part:
        print("\n".join(f"{p.name}=={p.version}" for p in closure if p.name not in fetch))
        return 0
    listing = [f"{name}=={version}  # {why}" for name, (version, why) in fetch.items()]
    print("\n".join(listing))
    print(f"gpu_wheels: {len(closure)} packages in the closure, {len(fetch)} to send", file=sys.stderr)
    if args.list:
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # two versions of one package would stop the install there
        old.unlink()
    download([f"{n}=={v}" for n, (v, _) in fetch.items()], args.dest)
    (args.dest / "requirements.txt").write_text("\n".join(top) + "\n")
    (args.dest / "fetched.txt").write_text("\n".join(listing) + "\n")
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu_wheels: {len(wheels)} wheels, {size:.1f} MiB in {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
