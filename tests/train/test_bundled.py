"""The bundled weights load, are fp16 and small, and restore a held-out photo (a fast 96-px crop)."""

import pytest
from safetensors import safe_open

from model.bundled import bundled_weights
from model.checkpoint import load_mprnet
from model.training.data import HOLDOUT_PHOTOS, load_photos
from model.training.degrade import benchmark_degrade
from model.training.evaluate import model_restorer, quantize, scores

# Gains measured on this crop are well above these floors (see model/weights/*.md); the floors
# only guard against shipping broken or swapped weights.
MIN_GAIN_DB = {"denoise": 4.0, "deblur": 0.5, "derain": 2.0}


@pytest.fixture(scope="module")
def crop():
    coffee = load_photos([HOLDOUT_PHOTOS[0]])[0]  # never trained on
    h, w = coffee.shape[:2]
    return coffee[h // 2 - 48:h // 2 + 48, w // 2 - 48:w // 2 + 48]


@pytest.mark.parametrize("task", ["denoise", "deblur", "derain"])
def test_bundled_weights_restore_a_held_out_photo(task, crop):
    path = bundled_weights(task)
    assert path.stat().st_size <= 8 * 1024 * 1024
    with safe_open(str(path), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
        assert f.metadata()["task"] == task
    restore = model_restorer(load_mprnet(path))
    low = quantize(benchmark_degrade(task, crop, seed=0))
    before, after = scores(low, crop)["psnr"], scores(quantize(restore(low)), crop)["psnr"]
    assert after > before + MIN_GAIN_DB[task], f"{task}: {before:.2f} dB -> {after:.2f} dB"
