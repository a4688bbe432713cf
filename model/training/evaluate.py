"""`mprnet evaluate`: PSNR / SSIM of a model against the degraded input and a classical baseline.

Images: paired folders (`--pairs`, layouts as in model/training/data.py), clean folders (`--clean`) or, by
default, the held-out scikit-image photos, degraded by ``benchmark_degrade`` with a fixed seed
per image (denoise: sigma 25; derain: `--rain heldout` draws the rain with the separately written
renderer of model/training/heldout_rain.py instead of the spec's, `--rain family[-PROFILE]` the training
family). Degraded inputs and all outputs are rounded to 8 bits before scoring, as they would be when
written to image files.

Metrics (on the 0-255 scale, peak 255): PSNR and SSIM on RGB, and on the Y channel of ITU-R
BT.601 YCbCr (16-235), as the papers report. SSIM is scikit-image's (Gaussian window, sigma 1.5).

Classical baselines (scikit-image): non-local means for noise (noise level estimated from the
image by the Haar-wavelet MAD, h = 0.8 sigma, fast mode), unsharp masking for blur (radius 2, amount 1), a 5 x 5 median
filter for rain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ..engine_api import ENGINES
from ..variants import TASKS
from .data import HOLDOUT_PHOTOS, find_pairs, list_images, load_image, skimage_photo_dir
from .degrade import EVAL_RAIN, benchmark_degrade

EVAL_SEED = 1000  # image i of a clean set is degraded with seed EVAL_SEED + i
METHODS = ("input", "baseline", "model")
Restore = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) float32 in [0, 1] -> same


def quantize(img: np.ndarray) -> np.ndarray:
    """Round to the 8-bit grid (what saving a PNG does), staying float32 in [0, 1]."""
    return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def psnr(out: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of two images on the same scale whose white is `peak` (arrays or tensors, computed in float64;
    identical images score 10 log10(peak^2 / 1e-12 peak^2) = 120 dB rather than infinity)."""
    a, b = (x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64) for x in (out, ref))
    mse = float(np.mean((a - b) ** 2))
    return 10.0 * math.log10(peak**2 / max(mse, 1e-12 * peak**2))


def to_y(img: np.ndarray) -> np.ndarray:
    """RGB [0, 1] -> BT.601 luma on the 0-255 scale (16-235), as MATLAB's rgb2ycbcr."""
    return 16.0 + img @ np.array([65.481, 128.553, 24.966], dtype=np.float64)


_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)  # as the papers' MATLAB SSIM


def colour_shift(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per channel (R, G, B): mean of `out` minus mean of `ref`, in 8-bit levels (a cast PSNR hides in a number)."""
    return (out.reshape(-1, 3).astype(np.float64).mean(0) - ref.reshape(-1, 3).astype(np.float64).mean(0)) * 255.0


def scores(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """PSNR / SSIM, RGB and Y, of `out` against `ref` (both (H, W, 3) in [0, 1]), and the largest per-channel
    mean shift in 8-bit levels (`colour_shift`)."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    y_out, y_ref = to_y(out64), to_y(ref64)
    return {
        "psnr": psnr(out64, ref64),
        "ssim": float(structural_similarity(ref64, out64, data_range=1.0, channel_axis=2, **_SSIM)),
        "psnr_y": psnr(y_out, y_ref, peak=255.0),
        "ssim_y": float(structural_similarity(y_ref, y_out, data_range=255.0, **_SSIM)),
        "colour_shift": float(np.abs(colour_shift(out64, ref64)).max()),
    }


def estimate_noise(img: np.ndarray) -> float:
    """Gaussian noise sigma (0-1 scale) from the median absolute Haar diagonal detail, averaged over
    channels (Donoho's MAD estimate; scikit-image's estimate_sigma does this with PyWavelets)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    a, b, c, d = img[0:h:2, 0:w:2], img[0:h:2, 1:w:2], img[1:h:2, 0:w:2], img[1:h:2, 1:w:2]
    hh = (a - b - c + d) / 2.0  # orthonormal Haar: white noise keeps its sigma
    return float(np.mean(np.median(np.abs(hh.reshape(-1, img.shape[2])), axis=0)) / 0.6745)


def baseline(task: str) -> Restore:
    """The classical scikit-image method for `task` (see the module docstring)."""
    from skimage.filters import median, unsharp_mask
    from skimage.restoration import denoise_nl_means

    if task == "denoise":
        def nlm(img: np.ndarray) -> np.ndarray:
            sigma = estimate_noise(img)
            return denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6,
                                    channel_axis=-1)
        return nlm
    if task == "deblur":
        # Per channel on contiguous float64 copies: called on strided float32 channel views,
        # scikit-image 0.2x returned sporadic NaNs here.
        return lambda img: np.stack([unsharp_mask(np.ascontiguousarray(img[..., c], dtype=np.float64), radius=2, amount=1.0)
                                     for c in range(3)], axis=-1)
    if task == "derain":
        square = np.ones((5, 5), bool)
        return lambda img: np.stack([median(img[..., c], footprint=square) for c in range(3)], axis=-1)
    raise ValueError(f"unknown task {task!r}")


def model_restorer(model: torch.nn.Module, device: str = "cpu", precision: str = "fp32", engine: str = "torch"
                   ) -> Restore:
    """Wrap any MPRNet-shaped module (returns a list, element 0 the result) as a Restore function, on `engine`."""
    from ..engine import EngineSettings
    from ..engine_api import build_engine

    restorer = build_engine(model, engine, device=device, precision=precision,
                            torch_settings=EngineSettings(compile="off", cuda_graphs=False))

    def run(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
        return restorer.restore_tensor(x).permute(1, 2, 0).numpy()

    return run


def load_set(task: str, pairs: str | None = None, clean: str | None = None, crop: int = 0,
             rain: str = "spec") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, degraded, target) triples; the degraded image is already on the 8-bit grid. `rain` picks the
    derain renderer for clean images: the spec's or the separately written held-out one."""
    if pairs:
        items = [(a.name, load_image(a), load_image(b)) for a, b in find_pairs(pairs)]
    else:
        files = list_images(clean) if clean else [skimage_photo_dir() / n for n in HOLDOUT_PHOTOS]
        items = []
        for i, f in enumerate(files):
            ref = load_image(f)
            ref = ref[:crop, :crop] if crop else ref
            items.append((f.name, benchmark_degrade(task, ref, EVAL_SEED + i, rain=rain), ref))
    if crop and pairs:
        items = [(n, a[:crop, :crop], b[:crop, :crop]) for n, a, b in items]
    if not items:
        raise ValueError("no images to evaluate")
    return [(n, quantize(a), b) for n, a, b in items]


def evaluate(task: str, restore: Restore | None, items: Sequence[tuple[str, np.ndarray, np.ndarray]],
             with_baseline: bool = True) -> dict:
    """Per-image and mean scores of the input, the baseline and the model (when given)."""
    methods: dict[str, Restore] = {"input": lambda x: x}
    if with_baseline:
        methods["baseline"] = baseline(task)
    if restore is not None:
        methods["model"] = restore
    rows = []
    for name, low, ref in items:
        rows.append({"image": name, **{m: scores(quantize(fn(low)), ref) for m, fn in methods.items()}})
    mean = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in rows[0][m]} for m in methods}
    return {"task": task, "images": rows, "mean": mean}


def markdown(result: dict) -> str:
    """A table: per image and mean, PSNR / SSIM (RGB) and PSNR / SSIM (Y) for every method."""
    methods = [m for m in METHODS if m in result["mean"]]
    names = {"input": "degraded input", "baseline": "scikit-image baseline", "model": "MPRNet"}
    head = "| image | " + " | ".join(f"{names[m]} RGB | {names[m]} Y" for m in methods) + " |"
    sep = "|---|" + "---|---|" * len(methods)
    fmt = lambda s: f"{s['psnr']:.2f} / {s['ssim']:.4f}"  # noqa: E731
    fmt_y = lambda s: f"{s['psnr_y']:.2f} / {s['ssim_y']:.4f}"  # noqa: E731
    lines = [head, sep]
    for r in [*result["images"], {"image": "**mean**", **result["mean"]}]:
        lines.append(f"| {r['image']} | " + " | ".join(f"{fmt(r[m])} | {fmt_y(r[m])}" for m in methods) + " |")
    shifts = ", ".join(f"{names[m]} {result['mean'][m]['colour_shift']:.1f}" for m in methods)
    worst = max(result["images"], key=lambda r: r[methods[-1]]["colour_shift"])
    lines += ["", f"Largest per-channel mean shift against the target, 8-bit levels, mean over images: {shifts}; "
              f"{names[methods[-1]]} at most {worst[methods[-1]]['colour_shift']:.1f} ({worst['image']})."]
    return "\n".join(lines) + "\n"


def _main(args: argparse.Namespace) -> int:
    from ..bundled import bundled_weights
    from ..checkpoint import load_mprnet

    weights = Path(args.weights) if args.weights else bundled_weights(args.task)
    items = load_set(args.task, args.pairs, args.clean, args.crop, rain=args.rain)
    restore = model_restorer(load_mprnet(weights), args.device, engine=args.engine)
    result = evaluate(args.task, restore, items, with_baseline=not args.no_baseline)
    result["weights"] = str(weights)
    table = f"{args.task}: PSNR (dB) / SSIM, mean over {len(items)} images\n\n" + markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("evaluate", help="PSNR/SSIM of a model vs the degraded input and a classical baseline")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--weights", help="checkpoint to evaluate (default: the bundled weights)")
    p.add_argument("--pairs", help="folder with degraded/target pairs")
    p.add_argument("--clean", help="folder of clean images, degraded with a fixed seed (default: held-out photos)")
    p.add_argument("--crop", type=int, default=0, help="evaluate only the top-left crop of this size (0: whole images)")
    p.add_argument("--no-baseline", action="store_true", help="skip the classical baseline")
    p.add_argument("--rain", default="spec", choices=EVAL_RAIN,
                   help="derain: draw the rain with the spec's renderer (what training's old single renderer drew), "
                   "the separately written held-out one (-thin: only its dense 1-px streaks) or the training family "
                   "(family-PROFILE: only that streak profile)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", default=os.environ.get("MPRNET_ENGINE", "auto"), choices=ENGINES,
                   help="auto (OpenVINO on the CPU when installed, else torch), torch, openvino")
    p.add_argument("--json", help="write the full results as JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.set_defaults(func=_main)
