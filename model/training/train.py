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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import MPRNet
from ..checkpoint import CheckpointError, read_state_dict, save_safetensors
from ..inference import resolve_device
from ..tiling import pad_to_multiple
from ..variants import TASKS, config_from_state_dict
from .data import (
    HOLDOUT_PHOTOS,
    TRAIN_PHOTOS,
    PairedPatches,
    SyntheticPatches,
    batch,
    eval_set_marker,
    find_pairs,
    list_images,
    load_image,
    load_photos,
    multiscale,
)
from .degrade import RAIN_BLENDS, RAIN_HAZE, RAIN_PROFILES, benchmark_degrade, parse_rain_family
from .evaluate import psnr
from .losses import mprnet_loss

VAL_SEED = 20210101  # validation images are degraded once, identically in every run


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr_min as progress goes 0 -> 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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
        crop = lambda path: to_t(center_crop(load_image(path), args.val_crop))  # noqa: E731
        return [(crop(a), crop(b)) for a, b in find_pairs(args.val_pairs)]
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
    return SyntheticPatches(multiscale(images), args.task, args.patch, rain=rain_family(args))


def refuse_eval_sets(args: argparse.Namespace) -> None:
    """Training and checkpoint choice never see an evaluation set (`mprnet photos --eval-set`)."""
    for option in ("clean", "pairs", "val_clean", "val_pairs"):
        folder = getattr(args, option)
        marker = eval_set_marker(folder) if folder else None
        if marker:
            raise SystemExit(f"mprnet train: --{option.replace('_', '-')} {folder} is or holds an evaluation set "
                             f"({marker}): evaluate on it with mprnet evaluate --clean, never train on it")


def rain_family(args: argparse.Namespace) -> dict | None:
    """The derain training family restricted by --rain-profiles / --rain-blends / --rain-haze (None: none given)."""
    given = (args.rain_profiles, args.rain_blends, args.rain_haze)
    if all(g is None for g in given):
        return None
    if args.task != "derain" or args.pairs:
        raise SystemExit("mprnet train: --rain-profiles, --rain-blends and --rain-haze shape the synthetic rain of "
                         "--task derain; they do nothing with another task or with --pairs")
    try:
        return parse_rain_family(*given)
    except ValueError as e:
        raise SystemExit(f"mprnet train: {e}") from None


def save_checkpoint(path: Path, model, opt, step: int, best: float, elapsed: float, rng: np.random.Generator, args) -> None:
    state = {
        "step": step, "best_psnr": best, "elapsed_s": elapsed, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "config": json.dumps(model_config(args)), "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def export(model: MPRNet, path: Path, args, step: int, best: float, elapsed: float) -> None:
    meta = {"task": args.task, "step": str(step), "val_psnr": f"{best:.3f}", "train_seconds": f"{elapsed:.0f}",
            "config": json.dumps(model_config(args))}
    family = rain_family(args)
    if family:
        meta["rain_family"] = json.dumps(family)
    save_safetensors(model, path, dtype=torch.float16, metadata=meta)


def train_step(model: MPRNet, opt: torch.optim.Optimizer, low: torch.Tensor, high: torch.Tensor, autocast,
               clip: float = 0.0) -> float:
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


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint so --resume continues from it."""

    step: int = 0
    best: float = -math.inf  # best validation PSNR so far (the spec's renderer for derain)
    elapsed: float = 0.0  # wall-clock seconds of training, across resumes


def build_model(args: argparse.Namespace, resuming: bool, device: torch.device) -> tuple[MPRNet, torch.optim.Optimizer]:
    """A fresh model (or, with --init and not resuming, the weights file's, with its widths) and its Adam."""
    if args.init and not resuming:
        init_from(args)
    model = MPRNet(**model_config(args)).to(device)
    if args.init and not resuming:
        model.load_state_dict(read_state_dict(args.init), strict=True)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def resume_from(last: Path, model: MPRNet, opt, rng: np.random.Generator, args: argparse.Namespace) -> Progress:
    """Load model, optimizer and RNG states from `last`; returns the saved progress."""
    state = torch.load(last, map_location="cpu", weights_only=True)
    if json.loads(state["config"]) != model_config(args):
        raise SystemExit(f"mprnet train: {last} has widths {state['config']}, not {model_config(args)}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(int(state["step"]), float(state["best_psnr"]), float(state["elapsed_s"]))


class Validator:
    """Scores the model on the validation set(s), keeps the best checkpoint and export, writes last.pt and
    one log line per call. Derain also scores rain from the separately written renderer (logged only)."""

    def __init__(self, args: argparse.Namespace, out: Path, device: torch.device) -> None:
        self.args, self.out, self.device = args, out, device
        self.val = validation_set(args)
        held_out = args.task == "derain" and not args.val_pairs
        self.val_heldout = validation_set(args, rain="heldout") if held_out else None
        self.log = open(out / "log.jsonl", "a")

    def __call__(self, model: MPRNet, opt, progress: Progress, rng: np.random.Generator, record: dict) -> float:
        val_psnr = validate(model, self.val, self.device)
        if val_psnr > progress.best:
            progress.best = val_psnr
            save_checkpoint(self.out / "best.pt", model, opt, progress.step, val_psnr, progress.elapsed, rng, self.args)
            export(model, self.out / "best.safetensors", self.args, progress.step, val_psnr, progress.elapsed)
        save_checkpoint(self.out / "last.pt", model, opt, progress.step, progress.best, progress.elapsed, rng,
                        self.args)
        record = {"step": progress.step, **record, "val_psnr": round(val_psnr, 3), "best": round(progress.best, 3),
                  "elapsed_s": round(progress.elapsed, 1)}
        if self.val_heldout:
            record["val_heldout_psnr"] = round(validate(model, self.val_heldout, self.device), 3)
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        if not self.args.quiet:
            from tqdm import tqdm

            tqdm.write(json.dumps(record))  # also when the bar is hidden (not a terminal): a readable nohup log
        return val_psnr

    def close(self) -> None:
        self.log.close()


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training; returns {"step", "best_psnr", "elapsed_s"}."""
    from tqdm import tqdm

    refuse_eval_sets(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"mprnet train: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    resuming = args.resume and (out / "last.pt").exists()
    model, opt = build_model(args, resuming, device)
    progress = resume_from(out / "last.pt", model, opt, rng, args) if resuming else Progress()
    source, validator = train_source(args), Validator(args, out, device)
    budget = args.max_minutes * 60.0 if args.max_minutes else math.inf
    start = time.monotonic() - progress.elapsed  # wall clock counts across resumes
    # bf16 autocast: always on CUDA; on CPUs with AVX512-BF16/AMX it also halves the step time.
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=args.steps, initial=progress.step, dynamic_ncols=True, mininterval=5.0, disable=args.quiet or None)
    ema, val_psnr, validated = math.nan, progress.best, progress.step
    model.train()
    while progress.step < args.steps:
        progress.elapsed = time.monotonic() - start
        if progress.elapsed >= budget:
            break
        lr = lr_at(max(progress.step / args.steps, progress.elapsed / budget), progress.step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        low, high = batch(source, args.batch, rng)
        low, high = low.to(device, non_blocking=True), high.to(device, non_blocking=True)
        loss = train_step(model, opt, low, high, autocast, args.clip)
        progress.step += 1
        ema = loss if math.isnan(ema) else 0.98 * ema + 0.02 * loss
        bar.update(1)
        if progress.step % args.val_every == 0 or progress.step == args.steps:
            progress.elapsed = time.monotonic() - start
            val_psnr, validated = validator(model, opt, progress, rng, {"loss": round(ema, 5), "lr": lr}), progress.step
        bar.set_postfix(loss=f"{ema:.4f}", val=f"{val_psnr:.2f}", best=f"{progress.best:.2f}", refresh=False)
    progress.elapsed = time.monotonic() - start
    if progress.step != validated:  # stopped between validations (time budget): validate what we have
        validator(model, opt, progress, rng, {"loss": round(ema, 5)})
    bar.close()
    validator.close()
    return {"step": progress.step, "best_psnr": progress.best, "elapsed_s": progress.elapsed}


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
    data.add_argument("--rain-profiles", help="derain: train only on these streak profiles, comma-separated, "
                      f"of {','.join(RAIN_PROFILES)} (default: all)")
    data.add_argument("--rain-blends", help=f"derain: only these blends, of {','.join(RAIN_BLENDS)} (default: both)")
    data.add_argument("--rain-haze", type=float, help=f"derain: probability of haze per image (0: none; default {RAIN_HAZE})")
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
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="forward pass under autocast; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.patch % 8:
        raise SystemExit("mprnet train: --patch must be a multiple of 8")
    if args.val_repeats < 1:
        raise SystemExit("mprnet train: --val-repeats must be at least 1")
    rain_family(args)  # refuse a bad family before any work (train() refuses evaluation sets first thing)
    try:
        MPRNet(**model_config(args))
    except ValueError as e:  # e.g. a reduction that does not divide a width
        raise SystemExit(f"mprnet train: {e}") from None
    result = train(args)
    print(json.dumps(result))
    return 0
