"""Evaluation: metrics, the identity model scores exactly the input, the CLI writes its reports."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from model.arch import MPRNet
from model.checkpoint import save_safetensors
from model.cli import main
from model.training.evaluate import (
    baseline,
    colour_shift,
    estimate_noise,
    evaluate,
    load_set,
    markdown,
    model_restorer,
    quantize,
    scores,
    to_y,
)
from model.variants import TINY


class Identity(nn.Module):
    def forward(self, x):
        return [x, x, x]


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_scores_of_known_noise():
    ref = np.full((64, 64, 3), 0.5, np.float32)
    out = ref + np.float32(10 / 255)  # a constant error of 10 levels: MSE 100
    s = scores(out, ref)
    assert s["psnr"] == pytest.approx(10 * np.log10(255**2 / 100), abs=1e-3)
    assert scores(ref, ref)["ssim"] == pytest.approx(1.0)
    assert to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235.0)
    assert to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)


def test_estimate_noise():
    rng = np.random.default_rng(0)
    flat = np.full((128, 128, 3), 0.5, np.float32)
    assert estimate_noise(flat + rng.normal(0, 0.05, flat.shape).astype(np.float32)) == pytest.approx(0.05, rel=0.05)


def test_identity_model_scores_the_input():
    items = load_set("denoise", crop=64)
    assert len(items) == 3  # the held-out photos
    result = evaluate("denoise", model_restorer(Identity()), items, with_baseline=False)
    for row in result["images"]:
        assert row["model"] == pytest.approx(row["input"])
    assert result["mean"]["input"]["psnr"] == pytest.approx(20.4, abs=0.6)  # sigma 25 on 8 bits
    assert result["mean"]["model"]["colour_shift"] == pytest.approx(result["mean"]["input"]["colour_shift"])
    assert "| **mean** |" in markdown(result)


def test_a_colour_cast_is_reported_per_channel():
    items = [(name, ref, ref) for name, _, ref in load_set("denoise", crop=64)]  # clean in, clean target
    darker_blue = lambda img: np.clip(img - np.array([0.0, 0.0, 6 / 255]), 0, 1)  # noqa: E731
    result = evaluate("denoise", darker_blue, items, with_baseline=False)
    assert all(row["input"]["colour_shift"] < 1e-6 for row in result["images"])
    assert all(5.0 < row["model"]["colour_shift"] < 6.01 for row in result["images"])  # 6 levels, less clipping at 0
    assert colour_shift(darker_blue(items[0][2]), items[0][2])[:2] == pytest.approx([0.0, 0.0])
    assert "MPRNet at most" in markdown(result)


@pytest.mark.parametrize("task", ["denoise", "deblur", "derain"])
def test_baselines_run_and_keep_shape(task):
    _, low, _ = load_set(task, crop=48)[0]
    out = baseline(task)(low)
    assert out.shape == low.shape and np.isfinite(out).all()


def test_inputs_are_on_the_8_bit_grid():
    _, low, _ = load_set("derain", crop=32)[0]
    assert np.array_equal(low, quantize(low))


def test_cli_writes_json_and_markdown(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(MPRNet(**TINY), weights, dtype=torch.float16)
    assert main(["evaluate", "--task", "derain", "--weights", str(weights), "--crop", "48",
                 "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["mean"]) == {"input", "baseline", "model"} and len(result["images"]) == 3
    assert "MPRNet RGB" in (tmp_path / "r.md").read_text()


def test_rain_option_picks_the_heldout_renderer(tmp_path):
    from model.training.evaluate import EVAL_SEED
    from model.training.heldout_rain import heldout_rain

    spec, heldout = load_set("derain", crop=48)[0], load_set("derain", crop=48, rain="heldout")[0]
    assert np.array_equal(spec[2], heldout[2]) and not np.array_equal(spec[1], heldout[1])
    assert np.array_equal(heldout[1], quantize(heldout_rain(heldout[2], np.random.default_rng(EVAL_SEED))))
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_safetensors(MPRNet(**TINY), weights, dtype=torch.float16)
    assert main(["evaluate", "--task", "derain", "--weights", str(weights), "--crop", "32", "--rain", "heldout",
                 "--no-baseline", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["mean"]["input"]["psnr"] == pytest.approx(
        np.mean([scores(low, ref)["psnr"] for _, low, ref in load_set("derain", crop=32, rain="heldout")]))
