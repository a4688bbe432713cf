"""bench/gpu.sh and its Python stages, on the CPU: they run, write what they promise, and read each other.

The GPU figures themselves come only from a run on a GPU machine (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import engine as bench_engine
from bench.gpu_report import LOAD_COLUMNS, load_table, summarize
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
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu-wheels.sh")], check=True)


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
