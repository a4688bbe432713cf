"""bench/train_gpu.sh: the GPU deblur run's command is the intended one, and its plumbing runs (CPU smoke)."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoint import load_mprnet

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "train_gpu.sh"


def run(*args, env=None, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def flags(command: str) -> dict[str, str]:
    words = shlex.split(command)
    return {w: words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else "" for i, w in enumerate(words)
            if w.startswith("--")}


def test_the_gpu_command_trains_deblur_wide_in_bf16_on_many_kernels():
    result = run("--print", env={"OUT": "/results", "DATA": "/data"})
    assert result.returncode == 0, result.stderr
    f = flags(result.stdout)
    assert "-m model train" in result.stdout and f["--task"] == "deblur" and f["--device"] == "cuda"
    assert int(f["--n-feat"]) >= 48 and int(f["--num-cab"]) >= 4 and f["--precision"] == "bf16"
    assert int(f["--val-repeats"]) >= 8 and f["--out"] == "/results/deblur" and f["--clean"] == "/data/photos"
    assert f["--val-clean"] == "/data/holdout"
    assert float(f["--max-minutes"]) <= 8  # the whole call must fit one 10-minute device command


def test_smoke_run_trains_and_exports_under_out(tmp_path):
    rng = np.random.default_rng(0)
    for folder, n, size in (("photos", 3, 80), ("holdout", 2, 64)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / folder / f"{i}.png")
    out = tmp_path / "out"
    result = run("--smoke", env={"OUT": str(out), "DATA": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout + result.stderr
    log = [json.loads(line) for line in (out / "deblur" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3]
    assert "--precision bf16" in (out / "deblur" / "command.txt").read_text()
    assert load_mprnet(out / "deblur" / "best.safetensors").shallow_feat1[0].weight.shape[0] == 8


def test_a_run_without_prepared_data_says_what_to_do(tmp_path):
    result = run("--smoke", env={"OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "missing")})
    assert result.returncode == 1 and "--prepare" in result.stderr
