"""bench/deblur_oracle.py: the non-blind Wiener yardstick for the deblur target."""

import numpy as np
import skimage.data

from bench.deblur_oracle import kernel_extent, oracle, wiener
from model.training.degrade import blur, linear_motion_kernel


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a - b) ** 2))


def test_wiener_with_the_true_kernel_undoes_most_of_a_blur():
    img = (skimage.data.astronaut()[100:196, 100:196] / 255.0).astype(np.float32)
    kernel = linear_motion_kernel(9, 30)
    blurred = blur(img, kernel)
    restored = wiener(blurred, kernel, 1e-2)
    assert restored.shape == img.shape and restored.dtype == np.float32
    assert psnr(restored, img) > psnr(blurred, img) + 3.0  # measured: 23.2 -> 26.7 dB
    assert kernel_extent(kernel) in (9, 10, 11)  # 9 px of travel plus the bilinear footprint


def test_oracle_regenerates_the_evaluation_kernels():
    result = oracle(crop=64)
    assert [r["image"] for r in result["images"]] == ["coffee.png", "chelsea.png", "rocket.jpg"]
    # The seeded kernels of `mprnet evaluate --task deblur` (extent measured once, fixed by the seeds).
    assert [r["kernel_extent_px"] for r in result["images"]] == [17, 5, 12]
    assert result["gain_db"] == result["mean"]["oracle_wiener"] - result["mean"]["input"]
