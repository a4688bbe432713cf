"""bench/gpu.sh and its Python stages, on the CPU: they run, write what they promise, and read each other.

The GPU figures themselves come only from a run on a GPU machine (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import torch

from bench import engine as bench_engine
from bench import gpu_wheels, importcheck
from bench.gpu_report import LOAD_COLUMNS, load_table, summarize, torch_line
from bench.gpu_report import main as report_main

ROOT = Path(__file__).resolve().parents[2]

LOAD_OUTPUT = """machine: x86_64, 16 CPUs; load average 3.0; task deblur; sizes 256x256
| load | requests | errors | req/s | MP/s | p50 ms |
|---|---|---|---|---|---|
| C=32 | 900 | 0 | 75.0 | 4.9 | 400.0 |
| C=64 | 1000 | 2 | 90.5 | 5.9 | 700.0 |
"""


def test_the_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
    for script in ("gpu-wheels.sh", "gpu-setup.sh", "check-gpu-setup.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], check=True)


def test_engine_driver_smoke_run_writes_json_and_markdown(tmp_path):
    assert bench_engine.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine.json").read_text())
    modes = [r["mode"] for r in report["rows"]]
    assert modes == ["reference", "eager", "uint8", "uint8 pipelined"]
    assert all(r["img_per_s"] > 0 for r in report["rows"]), report["rows"]
    assert report["checks"] and all(c["psnr_vs_fp32_db"] > 60 for c in report["checks"])  # fp32 against fp32 on the CPU
    assert "| tiny 32x32 | eager | 2 |" in (tmp_path / "engine.md").read_text()

    (tmp_path / "load.txt").write_text(LOAD_OUTPUT)
    assert (
        report_main(
            ["--out", str(tmp_path), "--load-mode", "eager", "--load-task", "tiny", "--load-size", "32", "--load-batch", "2"]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    eager = next(r for r in report["rows"] if r["mode"] == "eager")
    assert summary["http"]["ratio"] == pytest.approx(90.5 / eager["img_per_s"])
    assert "HTTP at saturation" in (tmp_path / "summary.md").read_text()


def test_load_table_reads_the_closed_loop_rows():
    rows = load_table(LOAD_OUTPUT)
    assert [r["load"] for r in rows] == ["C=32", "C=64"] and rows[1]["req/s"] == "90.5"
    # a run cut short: only the per-level lines on stderr, no header
    err = "INFO something\n| C=32 | 900 | 0 | 75.0 | 4.9 | 400.0 |\n"
    assert load_table(err, LOAD_COLUMNS) == [{"load": "C=32", "requests": "900", "errors": "0", "req/s": "75.0"}]


def test_summary_takes_the_best_mode_per_goal_and_says_what_was_not_measured():
    engine = {
        "environment": {"device": "cuda", "gpu": "test card", "torch": "x"},
        "rows": [
            {
                "goal": "g",
                "target": 10,
                "task": "deblur",
                "height": 8,
                "width": 8,
                "batch": 2,
                "mode": "reference",
                "img_per_s": 4.0,
            },
            {
                "goal": "g",
                "target": 10,
                "task": "deblur",
                "height": 8,
                "width": 8,
                "batch": 2,
                "mode": "graphs",
                "img_per_s": 8.0,
            },
            {
                "goal": "g",
                "target": 10,
                "task": "deblur",
                "height": 8,
                "width": 8,
                "batch": 4,
                "mode": "compile+graphs",
                "img_per_s": 12.0,
            },
            {
                "goal": "h",
                "target": 5,
                "task": "derain",
                "height": 8,
                "width": 8,
                "batch": 1,
                "mode": "compile+graphs",
                "skipped": "time budget",
            },
        ],
    }
    s = summarize(engine, None, "graphs", ("deblur", 8, 8, 2))
    g, h = s["goals"]
    assert (
        g["ours"] == {"img_per_s": 12.0, "mode": "compile+graphs", "batch": 4} and g["met"] is True and g["vs_reference"] == 3.0
    )
    assert h["ours"] is None and h["met"] is None
    assert "skipped" in s["http"]


@pytest.mark.slow
def test_the_whole_script_in_smoke_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], check=True, env=env, timeout=600, capture_output=True)
    assert {"gpu.log", "engine.json", "engine.md", "summary.json", "summary.md"} <= {p.name for p in tmp_path.iterdir()}


# --- what the GPU run measures: the paper's configurations, and which torch -----------------------


def test_engine_bench_times_the_paper_configuration_by_default():
    from model.variants import VARIANTS

    model, label = bench_engine.load_model("derain")
    assert {k: model.hparams[k] for k in VARIANTS["derain"]} == VARIANTS["derain"]
    assert label == "random paper (seed 0)"
    again, _ = bench_engine.load_model("derain")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    bundled, label = bench_engine.load_model("derain", bundled=True)
    assert label == "bundled derain.safetensors" and bundled.hparams["n_feat"] < VARIANTS["derain"]["n_feat"]


def test_report_names_the_pinned_torch_beside_the_machines():
    env = bench_engine.environment(torch.device("cpu"))
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={env['torch_pinned']}" in pin
    line = torch_line({"torch": "2.11.0+cu130", "torch_pinned": "2.13.0"})
    assert line == "torch 2.11.0+cu130 (the project pins 2.13.0)"
    assert torch_line({"torch": "2.13.0+cu130", "torch_pinned": "2.13.0"}) == "torch 2.13.0+cu130"


# --- set-up on the GPU machine: every module imports; the wheels it lacks -------------------------


def test_import_check_lists_the_serving_path_and_the_drivers():
    names = importcheck.modules()
    assert {"service.app", "service.routes", "model.engine", "bench.load", "bench.reference"} <= set(names)
    assert not [n for n in names if n.startswith("model.training") or n.endswith("__main__")]


def test_import_check_fails_where_find_spec_would_pass():
    """fastapi made unimportable (as a missing opentelemetry-api made it on the GPU machine): the
    module is still found, but the check imports it and fails, naming it."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'fastapi': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from bench import importcheck; sys.exit(importcheck.main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "service.app does not import: ImportError: blocked for the test" in proc.stdout
    assert "model.engine does not import" not in proc.stdout


def _pkg(name: str, version: str, *requires: str) -> gpu_wheels.Package:
    return gpu_wheels.Package(name, version, requires)


def test_wheels_sent_are_what_the_machine_lacks_or_may_hold_too_old():
    closure = [
        _pkg("fastapi", "0.165.0", "starlette>=0.40", "pydantic>=2.7", "opentelemetry-api>=1.20"),
        _pkg("starlette", "1.10.0", "anyio<5,>=3.6"),
        _pkg("pydantic", "2.14.4", "typing-extensions>=4.14.1"),
        _pkg("opentelemetry-api", "1.45.2", "typing-extensions>=4.5"),
        _pkg("anyio", "4.16.0", "idna>=2.8"),
        _pkg("idna", "3.20"),
        _pkg("typing-extensions", "4.16.0"),
        _pkg("numpy", "2.5.2"),
        _pkg("torch", "2.11.0", "nvidia-cudnn-cu13==9.19.0.56", "typing-extensions>=4.10.0", "filelock"),
        _pkg("nvidia-cudnn-cu13", "9.19.0.56"),
        _pkg("filelock", "3.20.0"),
        _pkg("spandrel", "0.4.2", "torch", "numpy"),
        _pkg("uvicorn", "0.54.0", "h11>=0.8", 'uvloop>=0.15.1; extra == "standard"', 'h11>=9; extra == "unasked"'),
        _pkg("h11", "0.16.0"),
        _pkg("uvloop", "0.23.0"),
    ]
    machine = {"numpy": "2.5.2", "torch": "2.11.0", "nvidia-cudnn-cu13": None, "filelock": None}
    machine |= {"typing-extensions": None, "anyio": "3.5.0", "idna": None, "h11": "0.16.0", "uvloop": None}
    run = ["fastapi>=0.115", "numpy>=1.26", "spandrel==0.4.2", "uvicorn[standard]>=0.30"]
    sent = gpu_wheels.to_fetch(closure, run, machine)
    assert set(sent) == {
        "fastapi", "starlette", "pydantic", "opentelemetry-api", "spandrel", "uvicorn",  # not in the image
        "typing-extensions",  # pydantic asks >=4.14.1 of an unknown version
        "anyio",  # the image's 3.5.0 is below starlette's >=3.6
        "idna",  # anyio is sent, and asks >=2.8 of an unknown version
        "uvloop",  # uvicorn[standard] asks >=0.15.1
    }  # fmt: skip
    # the image's own: numpy meets >=1.26, torch's CUDA pins are torch's business, h11 0.16.0 meets >=0.8
    # (>=9 is only for an extra nobody asked for)
    assert "anyio" in sent and "3.5.0" in sent["anyio"][1]
    assert sent["typing-extensions"][0] == "4.16.0"


def test_wheel_requirements_leave_torch_to_the_machine():
    reqs = gpu_wheels.run_requirements()
    names = {gpu_wheels.canonical(r.split("=")[0].split(">")[0].split("[")[0]) for r in reqs}
    assert "torch" not in names
    assert {"fastapi", "uvicorn", "isal", "spandrel", "spandrel-extra-arches", "httpx"} <= names
    assert "spandrel==0.4.2" in reqs  # the reference at the version the tests use
    machine = gpu_wheels.machine_packages()
    assert machine["torch"] == "2.11.0" and machine["typing-extensions"] is None and "fastapi" not in machine


@pytest.mark.slow
def test_wheel_closure_resolves_and_names_what_the_gpu_machine_lacked():
    """The real resolution (network): what the first GPU run was missing is on the list."""
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15).close()
    except OSError as err:
        pytest.skip(f"https://pypi.org cannot be reached from here ({err}): the closure is unchecked")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_wheels", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sent = {line.split("==")[0] for line in proc.stdout.splitlines() if "==" in line}
    lacked = {"opentelemetry-api", "isal", "httptools", "websockets", "watchfiles", "typing-extensions", "fastapi"}
    assert lacked <= sent, lacked - sent
    assert not sent & {"torch", "numpy", "nvidia-cudnn-cu13", "triton"}


@pytest.mark.slow
def test_set_up_installs_only_what_is_missing_and_imports_everything(tmp_path):
    """bench/gpu-setup.sh with this venv as the machine's Python: what it already satisfies needs no
    wheel (and no index); a requirement that nothing satisfies is reported; the import check runs."""
    setup = [str(ROOT / "bench" / "gpu-setup.sh"), sys.executable]
    satisfied = tmp_path / "satisfied"
    satisfied.mkdir()
    (satisfied / "requirements.txt").write_text("fastapi>=0.115\nnumpy>=1.26\n")
    env = {**os.environ, "WHEELS": str(satisfied)}
    proc = subprocess.run(["bash", *setup], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "install failed" not in proc.stdout, proc.stdout + proc.stderr
    assert re.search(r"import check: (\d+) of \1 modules import", proc.stdout), proc.stdout

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "requirements.txt").write_text("mprnet-no-such-package==1.0\n")
    env = {**os.environ, "WHEELS": str(missing)}
    proc = subprocess.run(["bash", *setup], env=env, capture_output=True, text=True, timeout=300)
    assert "gpu-setup: the wheel install failed" in proc.stdout, proc.stdout + proc.stderr
