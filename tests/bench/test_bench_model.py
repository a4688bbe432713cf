"""bench/model.py runs at a tiny size on the CPU and reports every field, for both implementations."""

from __future__ import annotations

import json

import pytest

from bench.model import count_flops, main
from model.variants import TINY, VARIANTS

FIELDS = {
    "impl", "config", "height", "width", "batch", "precision", "memory_format", "compile", "images_per_s",
    "megapixels_per_s", "tflops_per_s", "gflops_per_image", "median_s", "min_s", "first_call_s", "peak_mib",
    "repeats", "warmup", "max_abs_diff_vs_reference",
}


def test_cpu_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--config", "tiny", "--size", "16x24", "--batch", "1", "2",
            "--warmup", "0", "--repeats", "2", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.startswith("| impl | config | input | batch |")
    assert table.count("\n| ours | tiny | 16x24 |") == 2 and table.count("\n| reference | tiny | 16x24 |") == 2

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["machine"]["device"] == "cpu" and report["machine"]["threads"] == 1
    assert report["command"].startswith("python bench/model.py --device cpu")
    assert "RSS" in report["memory_method"] and report["timing"] == "time.perf_counter"
    rows = report["results"]
    assert len(rows) == 4 and all(set(r) == FIELDS for r in rows)  # no engine rows: no diff-vs-torch field
    for r in rows:
        assert r["images_per_s"] > 0 and r["megapixels_per_s"] > 0 and r["tflops_per_s"] > 0
        assert r["median_s"] >= r["min_s"] > 0 and r["peak_mib"] >= 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        assert r["megapixels_per_s"] == pytest.approx(r["images_per_s"] * r["height"] * r["width"] / 1e6)
        assert r["max_abs_diff_vs_reference"] <= 1e-5  # same weights, same function
        assert (r["precision"], r["memory_format"], r["compile"]) == ("fp32", "contiguous", "none")
    by_impl = {}
    for r in rows:
        by_impl.setdefault((r["height"], r["width"], r["batch"]), {})[r["impl"]] = r["gflops_per_image"]
    for case in by_impl.values():  # both implementations do the same arithmetic
        assert case["ours"] == pytest.approx(case["reference"])


def test_flop_count_matches_the_papers_figure():
    # the paper's deblur configuration at 256x256 is 1519 GFLOP, counted the same way
    assert count_flops("ours", VARIANTS["deblur"], (1, 3, 256, 256)) / 1e9 == pytest.approx(1519, abs=1)
    assert count_flops("ours", TINY, (2, 3, 16, 16)) == 2 * count_flops("ours", TINY, (1, 3, 16, 16))


def test_cpu_refuses_cuda_only_precisions():
    with pytest.raises(SystemExit, match="need CUDA"):
        main(["--device", "cpu", "--config", "tiny", "--size", "8", "--precision", "fp16"])


def test_engines_side_by_side_on_the_bundled_weights(tmp_path, capsys):
    pytest.importorskip("openvino")
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--config", "bundled-derain", "--size", "16x24", "--batch", "2", "--impl", "ours",
            "--engine", "torch", "openvino", "--warmup", "0", "--repeats", "1", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ours | bundled-derain | 16x24 | 2 |") == 1
    assert table.count("\n| openvino | bundled-derain | 16x24 | 2 |") == 1
    (ours, ov) = json.loads(out.read_text())["results"]
    assert (ours["impl"], ov["impl"]) == ("ours", "openvino")
    assert ov["max_abs_diff_vs_torch"] <= 1e-4 and ov["images_per_s"] > 0
    assert ov["gflops_per_image"] == pytest.approx(ours["gflops_per_image"])  # the same network
