"""How much could deblurring gain on the evaluation set? A non-blind oracle for context.

`mprnet evaluate --task deblur` blurs each held-out photo with a random kernel drawn with a fixed
seed (model/training/degrade.py, model/training/evaluate.py). This script regenerates those same kernels and
restores each image with Wiener deconvolution *given the true kernel* and the noise-to-signal
ratio that scores best against the clean photo: two things a blind restorer never knows. It
prints, per image, the kernel's extent, the PSNR of the blurred input and of the oracle, and the
means (RGB PSNR on the 8-bit grid, as `mprnet evaluate` scores).

It is a yardstick for the +3 dB blind-deblurring target, not a method: Wiener deconvolution is a
simple linear filter, so a good non-blind method would do better, and a blind one worse.

    python -m bench.deblur_oracle [--crop N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from model.training.degrade import random_blur_kernel
from model.training.evaluate import EVAL_SEED, load_set, quantize

NSR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def wiener_sweep(img: np.ndarray, kernel: np.ndarray, nsrs: Sequence[float]) -> list[np.ndarray]:
    """Deconvolve each channel of (H, W, 3) `img` by `kernel` (odd square, centred), once per ratio.

    The image is mirrored by 4 kernel radii on each side first, so the FFT's wrap-around lands
    in the mirrored margin rather than on the picture. The image and kernel spectra are computed
    once for all ratios.
    """
    r = kernel.shape[0] // 2
    h, w = img.shape[:2]
    m = 4 * r
    padded = np.pad(img, ((m, m), (m, m), (0, 0)), mode="symmetric").astype(np.float64)
    otf = np.zeros(padded.shape[:2])
    otf[: kernel.shape[0], : kernel.shape[1]] = kernel
    otf = np.fft.fft2(np.roll(otf, (-r, -r), axis=(0, 1)))  # kernel centre at the origin
    spectrum = np.fft.fft2(padded, axes=(0, 1))
    outs = []
    for nsr in nsrs:
        gain = np.conj(otf) / (np.abs(otf) ** 2 + nsr)
        out = np.real(np.fft.ifft2(spectrum * gain[:, :, None], axes=(0, 1)))
        outs.append(np.clip(out[m:m + h, m:m + w], 0.0, 1.0).astype(np.float32))
    return outs


def wiener(img: np.ndarray, kernel: np.ndarray, nsr: float) -> np.ndarray:
    """Wiener deconvolution with one noise-to-signal ratio (see `wiener_sweep`)."""
    return wiener_sweep(img, kernel, [nsr])[0]


def kernel_extent(kernel: np.ndarray, floor: float = 1e-3) -> int:
    """Side of the bounding box of the kernel's taps above `floor`, in px."""
    ys, xs = np.nonzero(kernel > floor)
    return int(max(np.ptp(ys), np.ptp(xs)) + 1)


def _psnr(ref: np.ndarray, img: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(ref, quantize(img), data_range=1.0))


def oracle(crop: int = 0) -> dict:
    rows = []
    for i, (name, low, ref) in enumerate(load_set("deblur", crop=crop)):
        kernel = random_blur_kernel(np.random.default_rng(EVAL_SEED + i))  # benchmark_degrade's first draw
        scores = {n: _psnr(ref, out) for n, out in zip(NSR_GRID, wiener_sweep(low, kernel, NSR_GRID), strict=True)}
        best_nsr = max(scores, key=scores.get)
        rows.append({"image": name, "kernel_extent_px": kernel_extent(kernel), "input": _psnr(ref, low),
                     "oracle_wiener": scores[best_nsr], "nsr": best_nsr})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("input", "oracle_wiener")}
    return {"images": rows, "mean": mean, "gain_db": mean["oracle_wiener"] - mean["input"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crop", type=int, default=0, help="top-left crop of each photo (0: whole, as mprnet evaluate)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = oracle(args.crop)
    print("| image | kernel extent px | blurred input dB | Wiener with the true kernel dB |")
    print("|---|---|---|---|")
    for r in result["images"]:
        print(f"| {r['image']} | {r['kernel_extent_px']} | {r['input']:.2f} | {r['oracle_wiener']:.2f} |")
    m = result["mean"]
    print(f"| **mean** | | {m['input']:.2f} | {m['oracle_wiener']:.2f} (+{result['gain_db']:.2f} dB) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
