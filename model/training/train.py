"""`mprnet train`: the paper's recipe for any MPRNet width, on CPU or CUDA.

Loss: sum over the three stage outputs of Charbonnier (eps 1e-3) + 0.05 x edge loss
(model/training/losses.py), computed in fp32. Adam (0.9, 0.999), lr warmed up linearly, then cosine-decayed to `--lr-min`.
With `--max-minutes`, the decay follows whichever runs out first, steps or wall clock, so a
time-boxed run still finishes at the low learning rate. Data: paired folders (`--pairs`), clean
folders (`--clean`) or, by default, scikit-image's freely licensed photos, degraded on the fly by
model/training/degrade.py. Validation (PSNR on held-out images degraded with a fixed seed) runs every
`--val-every` steps; the best weights are kept and exported as fp16 safetensors.

Outputs under `--out`: ``last.pt`` (resumable: model, optimizer, step, RNG states, elapsed time),
``best.pt``, ``best.safetensors`` (fp16) and ``log.jsonl`` (one line per validation).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..arch import MPRNet
from ..checkpoint import CheckpointError, read_state_dict, save_safetensors
from .data import (
    HOLDOUT_PHOTOS,
    TRAIN_PHOTOS,
    PairedPatches,
    SyntheticPatches,
    batch,
    find_pairs,
    list_images,
    load_image,
    load_photos,
    multiscale,
)
from .degrade import benchmark_degrade
from .losses import mprnet_loss
from ..tiling import pad_to_multiple
from ..variants import TASKS, config_from_state_dict

VAL_SEED = 20210101  # validation images are degraded once, identically in every run


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr_min as progress goes 0 -> 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (peak 1, i.e. 255 on the 8-bit scale)."""
    mse = torch.mean((x.float() - y.float()) ** 2).item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return img
    h, w = img.shape[:2]
    s = min(size, h, w) // 8 * 8
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s]


def validation_set(args: argparse.Namespace, rain: str = "spec") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(degraded, clean) (3, H, W) tensors: paired files as they are, clean ones degraded with VAL_SEED
    (derain: by the `rain` renderer, see degrade.benchmark_degrade)."""
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()  # noqa: E731
    if args.val_pairs:
        return [(to_t(center_crop(load_image(a), args.val_crop)), to_t(center_crop(load_image(b), args.val_crop))) for a, b in find_pairs(args.val_pairs)]
    clean = [load_image(p) for p in list_images(args.val_clean)] if args.val_clean else load_photos(HOLDOUT_PHOTOS)
    clean = [center_crop(c, args.val_crop) for c in clean]
    # Repeat r degrades every image again with seeds VAL_SEED + i + 1000 r: more blur kernels / rain
    # patterns per photo, so a handful of photos can still rank checkpoints (repeat 0 is the default set).
    return [(to_t(benchmark_degrade(args.task, c, VAL_SEED + i + 1000 * r, rain=rain)), to_t(c))
            for r in range(args.val_repeats) for i, c in enumerate(clean)]


@torch.no_grad()
def validate(model: MPRNet, val: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean PSNR of stage-3 outputs (clamped to [0, 1]) over the validation images."""
    model.eval()
    scores = []
    for low, high in val:
        h, w = low.shape[1:]
        out = model(pad_to_multiple(low).unsqueeze(0).to(device))[0][0, :, :h, :w].clamp(0, 1).cpu()
        scores.append(psnr(out, high))
    model.train()
    return float(np.mean(scores))


def model_config(args: argparse.Namespace) -> dict:
    return dict(in_c=3, out_c=3, n_feat=args.n_feat, scale_unetfeats=args.scale_unet, scale_orsnetfeats=args.scale_ors,
                num_cab=args.num_cab, kernel_size=3, reduction=args.reduction, bias=False)


def init_from(args: argparse.Namespace) -> None:
    """--init: take the widths from the weights file (its shapes), overriding --n-feat and the rest."""
    try:
        config = config_from_state_dict(read_state_dict(args.init))
    except (CheckpointError, KeyError, IndexError, ZeroDivisionError) as e:
        raise SystemExit(f"mprnet train: --init {args.init}: {e}") from None
    if config["in_c"] != 3 or config["out_c"] != 3 or config["kernel_size"] != 3 or config["bias"]:
        raise SystemExit(f"mprnet train: --init {args.init}: only RGB, kernel 3, bias-free models train here, not {config}")
    args.n_feat, args.scale_unet, args.scale_ors = config["n_feat"], config["scale_unetfeats"], config["scale_orsnetfeats"]
    args.num_cab, args.reduction = config["num_cab"], config["reduction"]


def train_source(args: argparse.Namespace):
    if args.pairs:
        return PairedPatches(find_pairs(args.pairs), args.patch)
    images = [load_image(p) for p in list_images(args.clean)] if args.clean else load_photos(TRAIN_PHOTOS)
    return SyntheticPatches(multiscale(images), args.task, args.patch)


def save_checkpoint(path: Path, model, opt, step: int, best: float, elapsed: float, rng: np.random.Generator, args) -> None:
    state = {
        "step": step, "best_psnr": best, "elapsed_s": elapsed, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "config": json.dumps(model_config(args)), "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def export(model: MPRNet, path: Path, args, step: int, best: float, elapsed: float) -> None:
    meta = {"task": args.task, "step": str(step), "val_psnr": f"{best:.3f}", "train_seconds": f"{elapsed:.0f}", "config": json.dumps(model_config(args))}
    save_safetensors(model, path, dtype=torch.float16, metadata=meta)


def train_step(model: MPRNet, opt: torch.optim.Optimizer, low: torch.Tensor, high: torch.Tensor, autocast, clip: float = 0.0) -> float:
    """One optimisation step on a (B, 3, P, P) batch; returns the loss (the paper's, fp32)."""
    with autocast:
        outputs = model(low)
    loss = mprnet_loss(outputs, high)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training; returns {"step", "best_psnr", "elapsed_s"}."""
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.init and not (args.resume and (out / "last.pt").exists()):
        init_from(args)
    model = MPRNet(**model_config(args)).to(device)
    if args.init and not (args.resume and (out / "last.pt").exists()):
        model.load_state_dict(read_state_dict(args.init), strict=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    step, best, elapsed = 0, -math.inf, 0.0
    last = out / "last.pt"
    if args.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if json.loads(state["config"]) != model_config(args):
            raise SystemExit(f"mprnet train: {last} has widths {state['config']}, not {model_config(args)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, best, elapsed = int(state["step"]), float(state["best_psnr"]), float(state["elapsed_s"])
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    source, val = train_source(args), validation_set(args)
    # Derain also scores a second renderer that training never draws from (logged, not used to pick checkpoints).
    val_heldout = validation_set(args, rain="heldout") if args.task == "derain" and not args.val_pairs else None
    budget = args.max_minutes * 60.0 if args.max_minutes else math.inf
    start = time.monotonic() - elapsed  # wall clock counts across resumes
    # bf16 autocast: always on CUDA; on CPUs with AVX512-BF16/AMX it also halves the step time.
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, mininterval=5.0, disable=args.quiet or None)
    ema, val_psnr = None, best
    model.train()
    while step < args.steps:
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        progress = max(step / args.steps, elapsed / budget)
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, args)
        low, high = batch(source, args.batch, rng)
        loss = train_step(model, opt, low.to(device, non_blocking=True), high.to(device, non_blocking=True), autocast, args.clip)
        step += 1
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.update(1)
        if step % args.val_every == 0 or step == args.steps:
            val_psnr = validate(model, val, device)
            elapsed = time.monotonic() - start
            if val_psnr > best:
                best = val_psnr
                save_checkpoint(out / "best.pt", model, opt, step, best, elapsed, rng, args)
                export(model, out / "best.safetensors", args, step, best, elapsed)
            save_checkpoint(last, model, opt, step, best, elapsed, rng, args)
            record = {"step": step, "loss": round(ema, 5), "val_psnr": round(val_psnr, 3), "best": round(best, 3), "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)}
            if val_heldout:
                record["val_heldout_psnr"] = round(validate(model, val_heldout, device), 3)
            line = json.dumps(record)
            log.write(line + "\n")
            log.flush()
            if not args.quiet:
                bar.write(line)  # also when the bar is hidden (not a terminal): a readable nohup log
        bar.set_postfix(loss=f"{ema:.4f}", val=f"{val_psnr:.2f}", best=f"{best:.2f}", refresh=False)
    elapsed = time.monotonic() - start
    if step % args.val_every:  # stopped between validations (time budget): validate what we have
        val_psnr = validate(model, val, device)
        if val_psnr > best:
            best = val_psnr
            save_checkpoint(out / "best.pt", model, opt, step, best, elapsed, rng, args)
            export(model, out / "best.safetensors", args, step, best, elapsed)
        save_checkpoint(last, model, opt, step, best, elapsed, rng, args)
        log.write(json.dumps({"step": step, "loss": ema, "val_psnr": round(val_psnr, 3), "best": round(best, 3), "elapsed_s": round(elapsed, 1)}) + "\n")
    bar.close()
    log.close()
    return {"step": step, "best_psnr": best, "elapsed_s": elapsed}


def register_cli(sub) -> None:
    p = sub.add_parser("train", help="train an MPRNet (paper recipe) on paired folders or synthetic degradations")
    p.add_argument("--task", required=True, choices=TASKS, help="which synthetic degradation to apply to clean images")
    p.add_argument("--out", required=True, help="folder for last.pt, best.pt, best.safetensors, log.jsonl")
    data = p.add_argument_group("data (default: scikit-image's sample photos, held-out ones for validation)")
    data.add_argument("--pairs", help="folder with degraded/target pairs (GoPro, Rain13K, SIDD layouts)")
    data.add_argument("--clean", help="folder of clean images, degraded on the fly")
    data.add_argument("--val-pairs", help="paired validation folder")
    data.add_argument("--val-clean", help="clean validation folder (degraded with a fixed seed)")
    data.add_argument("--val-crop", type=int, default=256, help="centre crop of validation images (0: whole)")
    data.add_argument("--val-repeats", type=int, default=1, help="degrade each clean validation image this many times, "
                      "each with its own seed (more kernels per photo for deblur; ignored with --val-pairs)")
    arch = p.add_argument_group("architecture")
    arch.add_argument("--n-feat", type=int, default=16)
    arch.add_argument("--scale-unet", type=int, default=8)
    arch.add_argument("--scale-ors", type=int, default=8)
    arch.add_argument("--num-cab", type=int, default=2)
    arch.add_argument("--reduction", type=int, default=4)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=20000)
    opt.add_argument("--batch", type=int, default=8)
    opt.add_argument("--patch", type=int, default=64, help="training crop (multiple of 8)")
    opt.add_argument("--lr", type=float, default=2e-4)
    opt.add_argument("--lr-min", type=float, default=1e-6)
    opt.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    opt.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip (0: off, as in the paper)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--val-every", type=int, default=250)
    opt.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget (0: none); the lr decay follows it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", help="fine-tune: start from these weights (any format mprnet loads; widths from the file) "
                   "with a fresh optimizer and schedule; ignored when --resume finds OUT/last.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (bf16 autocast on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="forward pass under autocast; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.patch % 8:
        raise SystemExit("mprnet train: --patch must be a multiple of 8")
    if args.val_repeats < 1:
        raise SystemExit("mprnet train: --val-repeats must be at least 1")
    try:
        MPRNet(**model_config(args))
    except ValueError as e:  # e.g. a reduction that does not divide a width
        raise SystemExit(f"mprnet train: {e}") from None
    result = train(args)
    print(json.dumps(result))
    return 0
