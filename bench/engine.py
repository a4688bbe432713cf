"""Engine benchmark: our engine's modes beside the reference MPRNet (spandrel's), one card, one run.

Rows are the GPU targets' configurations; each is timed for the reference (bf16 autocast + channels_last,
eager: the authors' best plain setting) and our engine in the modes asked for:

    eager            bf16 + channels_last, no compile, no graphs
    graphs           eager kernels, one CUDA graph per shape replayed
    compile+graphs   inductor-compiled (default mode) and captured as a CUDA graph: the service's CUDA default
    reduce-overhead  inductor's own CUDA graphs (torch.compile mode="reduce-overhead")
    uint8            compile+graphs fed uint8 pixels from the host and returning uint8 to the host, one
                     batch after another (copies included); "uint8 pipelined" submits the next batch
                     before waiting on the last, so uploads overlap compute

Timing: CUDA events around each pass after warm-up passes, the median of --repeats (perf_counter on
the CPU); the input is already on the device except in the uint8 modes; cuDNN's algorithm search
(`cudnn.benchmark`) is on for every row. Weights: seeded random weights of the paper's configuration
for each task (model/variants.py), the same in both implementations, so the figures compare with the
authors' code and the targets; --bundled-weights times the small bundled models instead (not
comparable: a different width). Correctness: every fast
mode's output is compared with our eager output (PSNR, max difference), and for each task a real
photo is restored in bf16 and fp32 (TF32 off) and compared. A row whose compile would start after
--budget-s is skipped and says so; results are rewritten after every measurement, so a run cut
short by `timeout` keeps what it measured.

    python -m bench.engine --out out/          # CUDA: the issue's rows (bench/gpu.sh runs this)
    python -m bench.engine --smoke --out out/  # CPU, tiny config, eager modes: the driver runs
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_report import torch_line
from model.arch import MPRNet
from model.engine import Engine, EngineSettings
from model.variants import TINY, VARIANTS

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "model" / "samples" / "coffee_noisy.png"
MODES = {  # mode -> EngineSettings fields
    "eager": {"compile": "off", "cuda_graphs": False},
    "graphs": {"compile": "off", "cuda_graphs": True},
    "compile+graphs": {"compile": "default", "cuda_graphs": True},
    "reduce-overhead": {"compile": "reduce-overhead", "cuda_graphs": False},
}
COMPILED = {"compile+graphs", "reduce-overhead", "uint8", "uint8 pipelined"}


@dataclass(frozen=True)
class Row:
    task: str
    height: int
    width: int
    batch: int
    target: float | None  # img/s the issue asks for (best over the batches tried for "best batch" rows)
    modes: tuple[str, ...]
    goal: str  # which line of the table this row serves


# In priority order: the budget cuts from the end.
GPU_ROWS = (
    Row(
        "deblur",
        256,
        256,
        32,
        330,
        ("reference", "eager", "graphs", "compile+graphs", "uint8", "uint8 pipelined"),
        "deblur 256x256 best batch",
    ),
    Row("deblur", 256, 256, 1, 150, ("reference", "eager", "graphs", "compile+graphs"), "deblur 256x256 batch 1"),
    Row("derain", 256, 256, 32, 600, ("reference", "eager", "graphs", "compile+graphs"), "derain 256x256 best batch"),
    Row("deblur", 720, 1280, 1, 20, ("reference", "eager", "graphs", "compile+graphs"), "deblur 1280x720 batch 1"),
    Row("deblur", 256, 256, 64, 330, ("reference", "eager", "compile+graphs"), "deblur 256x256 best batch"),
    Row("derain", 256, 256, 64, 600, ("reference", "eager", "compile+graphs"), "derain 256x256 best batch"),
    Row("deblur", 256, 256, 1, 150, ("reduce-overhead",), "deblur 256x256 batch 1"),
)
SMOKE_ROWS = (Row("tiny", 32, 32, 2, None, ("reference", "eager", "uint8", "uint8 pipelined"), "smoke"),)
PSNR_MIN = 45.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) between two images in [0, 1]."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def photo(height: int, width: int) -> torch.Tensor:
    """(3, height, width) float in [0, 1]: the bundled sample photo, resized to cover and cropped."""
    from PIL import Image

    img = Image.open(PHOTO).convert("RGB")
    scale = max(width / img.width, height / img.height)
    img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))), Image.Resampling.BICUBIC)
    arr = np.asarray(img.crop((0, 0, width, height)), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_model(task: str, seed: int = 0, bundled: bool = False) -> tuple[MPRNet, str]:
    """Seeded random weights of the task's paper configuration (TINY for "tiny"); with `bundled`, the
    repository's bundled weights of the task instead."""
    if bundled:
        from model.checkpoint import load_mprnet

        path = ROOT / "model" / "weights" / f"{task}.safetensors"
        return load_mprnet(path), f"bundled {path.name}"
    torch.manual_seed(seed)
    config = "tiny" if task == "tiny" else "paper"
    return MPRNet(**(TINY if task == "tiny" else VARIANTS[task])), f"random {config} (seed {seed})"


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1000


class Bench:
    def __init__(
        self, device: torch.device, out: Path, budget_s: float, warmup: int, repeats: int, bundled: bool = False
    ) -> None:
        self.device, self.out, self.budget_s, self.warmup, self.repeats = device, out, budget_s, warmup, repeats
        self.bundled = bundled
        self.start = time.monotonic()
        self.models: dict[str, tuple[MPRNet, str]] = {}
        self.engines: dict[tuple[str, str], Engine] = {}
        self.references: dict[str, torch.nn.Module] = {}
        self.report: dict[str, Any] = {"environment": environment(device), "rows": [], "checks": [], "memory": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def model(self, task: str) -> MPRNet:
        if task not in self.models:
            self.models[task] = load_model(task, bundled=self.bundled)
        return self.models[task][0]

    def engine(self, task: str, mode: str) -> Engine:
        if self.device.type != "cuda":  # no graphs on the CPU, and compiling takes minutes: the smoke run is eager
            mode = "eager"
        key = (task, "compile+graphs" if mode.startswith("uint8") else mode)
        if key not in self.engines:
            self.engines[key] = Engine(
                self.model(task), device=self.device, settings=EngineSettings(max_batch=64, **MODES[key[1]])
            )
        return self.engines[key]

    def reference(self, task: str) -> torch.nn.Module:
        if task not in self.references:
            from bench.reference import reference_mprnet

            ours = self.model(task)
            ref = reference_mprnet(**ours.hparams)
            ref.load_state_dict(ours.state_dict())  # same names as the release: same weights in both
            cl = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
            self.references[task] = ref.eval().to(self.device, memory_format=cl)
        return self.references[task]

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "engine.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "engine.md").write_text(markdown(self.report))

    # ---- one row -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_row(self, row: Row) -> None:
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(row.batch, 3, row.height, row.width, generator=gen).to(self.device)
        baseline = None
        for mode in row.modes:
            result: dict[str, Any] = {**asdict(row), "modes": None, "mode": mode}
            if mode in COMPILED and self.device.type == "cuda" and self.elapsed() > self.budget_s:
                result["skipped"] = f"time budget ({self.budget_s:.0f} s) spent before this compile"
                self._record(result)
                continue
            try:
                t0 = time.monotonic()
                fn, out, batches = self._prepare(row, mode, x)
                result["prepare_s"] = round(time.monotonic() - t0, 2)
                seconds = median_seconds(fn, self.device, self.warmup, self.repeats) / batches
                result.update(ms=seconds * 1000, img_per_s=row.batch / seconds)
                if mode == "eager":
                    baseline = out
                elif baseline is not None and out is not None and not mode.startswith("uint8"):
                    result["psnr_vs_eager_db"] = psnr(out, baseline)
                    result["max_abs_vs_eager"] = (out - baseline).abs().max().item()
            except Exception as e:  # noqa: BLE001 - one failed mode is a row in the report, not the end of the run
                result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._record(result)

    def _record(self, result: dict[str, Any]) -> None:
        self.report["rows"].append(result)
        self.save()
        shown = {
            k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items() if k not in ("modes", "goal", "target")
        }
        print(json.dumps(shown), flush=True)

    def _prepare(self, row: Row, mode: str, x: torch.Tensor) -> tuple[Callable[[], Any], torch.Tensor | None, int]:
        """The timed function for a mode, its float output on `x` (None for the uint8 modes), and the
        number of batches one call runs."""
        cuda = self.device.type == "cuda"
        if mode == "reference":
            ref = self.reference(row.task)

            def fn() -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                    return ref(x.contiguous(memory_format=torch.channels_last) if cuda else x)[0]

            return fn, fn().float().clamp(0, 1), 1
        engine = self.engine(row.task, mode)
        memory = engine.prepare(row.batch, row.height, row.width)
        self.report["memory"].append(
            {"task": row.task, "mode": mode, "batch": row.batch, "height": row.height, "width": row.width, **asdict(memory)}
        )
        if not mode.startswith("uint8"):
            return (lambda: engine._core(x)), engine._core(x).clone(), 1
        # host batches as a decoder leaves them (pageable memory); the engine stages them in pinned memory
        host = [torch.randint(0, 256, (row.batch, row.height, row.width, 3), dtype=torch.uint8) for _ in range(4)]
        if mode == "uint8":
            return (lambda: [engine.run_uint8(h) for h in host]), None, len(host)

        def pipelined() -> list[torch.Tensor]:
            pending = [engine.submit_uint8(h) for h in host]  # uploads queue up behind the computes
            return [p.result() for p in pending]

        return pipelined, None, len(host)

    # ---- correctness on a photo ----------------------------------------------------------------

    @torch.inference_mode()
    def check_photo(self, task: str, size: int, fast: bool) -> None:
        """bf16 against fp32 with TF32 off, on a real photo: the eager engine, or (`fast`) every other
        engine built for the task so far, each at a batch size it already has (no new compile)."""
        x = photo(size, size).unsqueeze(0).to(self.device)
        cuda = self.device.type == "cuda"
        model = self.model(task)
        fp32 = Engine(model, device=self.device, precision="fp32", settings=EngineSettings(compile="off", cuda_graphs=False))
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref = fp32._core(x).clone()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        candidates = (
            {mode: e for (t, mode), e in self.engines.items() if t == task and mode != "eager"}
            if fast
            else {"eager": self.engine(task, "eager")}
        )
        for mode, engine in candidates.items():
            shapes = [s for s in engine.warm_shapes() if s[1:] == (size, size)] or [(1, size, size)]
            batch = shapes[0][0]  # a batch size this engine already has for the shape: no new compile
            y = engine._core(x.expand(batch, -1, -1, -1).contiguous())[:1].clone()
            value = psnr(y, ref)
            check = {
                "task": task,
                "weights": self.models[task][1],
                "photo": f"{PHOTO.name} {size}x{size}",
                "mode": mode,
                "precision": engine.precision,
                "psnr_vs_fp32_db": value,
                "pass": value >= PSNR_MIN if cuda else None,
            }
            self.report["checks"].append(check)
            self.save()
            print(json.dumps(check), flush=True)


def pinned_torch() -> str | None:
    """The torch version pyproject.toml pins (the GPU machines may carry another)."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if d.replace(" ", "").startswith("torch==")]
    return pins[0] if pins else None


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "torch_pinned": pinned_torch(), "python": platform.python_version()}
    env.update(machine=platform.machine(), device=str(device))
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Card: {env.get('gpu', env['device'])}; {torch_line(env)}, CUDA {env.get('cuda', '-')}",
        f"Weights: {env.get('weights', '-')}",
        "",
        "| configuration | mode | batch | img/s | ms/batch | vs reference | PSNR vs eager (dB) | target img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {
        (r["task"], r["height"], r["width"], r["batch"]): r.get("img_per_s") for r in report["rows"] if r["mode"] == "reference"
    }
    for r in report["rows"]:
        conf = f"{r['task']} {r['width']}x{r['height']}"
        if "img_per_s" not in r:
            lines.append(f"| {conf} | {r['mode']} | {r['batch']} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        base = ref.get((r["task"], r["height"], r["width"], r["batch"]))
        speedup = f"{r['img_per_s'] / base:.2f}x" if base else ""
        p = r.get("psnr_vs_eager_db")
        lines.append(
            f"| {conf} | {r['mode']} | {r['batch']} | {r['img_per_s']:.1f} | {r['ms']:.2f} | {speedup} | "
            f"{'' if p is None else ('exact' if math.isinf(p) else f'{p:.1f}')} | {r['target'] or ''} |"
        )
    if report["checks"]:
        lines += ["", "| task | weights | mode | precision | PSNR vs fp32 (dB) | >= 45 dB |", "|---|---|---|---|---|---|"]
        for c in report["checks"]:
            lines.append(
                f"| {c['task']} | {c['weights']} | {c['mode']} | {c['precision']} | {c['psnr_vs_fp32_db']:.1f} | {c['pass']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config, eager modes only: checks that the driver runs")
    ap.add_argument("--budget-s", type=float, default=270, help="start no compile after this many seconds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--bundled-weights",
        action="store_true",
        help="time the small bundled models (model/weights), not the paper configurations (figures not comparable)",
    )
    ap.add_argument(
        "--cache-dir", default="/tmp/mprnet-compile-cache", help="inductor cache (shared with the server of bench/gpu.sh)"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        device, rows, photo_tasks = torch.device("cpu"), SMOKE_ROWS, [("tiny", 32)]
        args.warmup, args.repeats = 1, 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            ap.error("needs CUDA (use --smoke on the CPU)")
        device, rows, photo_tasks = torch.device("cuda"), GPU_ROWS, [("deblur", 256), ("derain", 256), ("denoise", 256)]
        from model.engine import configure_compile_cache

        configure_compile_cache(args.cache_dir)
        # static shapes everywhere, so cuDNN's own algorithm search is on for every row, the reference's
        # too (a static engine would switch it on for the whole process anyway)
        torch.backends.cudnn.benchmark = True
    bundled = args.bundled_weights and not args.smoke
    bench = Bench(device, args.out, args.budget_s, args.warmup, args.repeats, bundled=bundled)
    bench.report["environment"]["weights"] = (
        "bundled (model/weights)" if bundled else "seeded random weights of the configurations in model/variants.py"
    )
    for task, size in photo_tasks:  # cheap, and first: a run cut short still has them
        bench.check_photo(task, size, fast=False)
    for row in rows:
        bench.run_row(row)
    for task, size in photo_tasks:
        bench.check_photo(task, size, fast=True)
    bench.report["elapsed_s"] = round(bench.elapsed(), 1)
    bench.save()
    print(markdown(bench.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
