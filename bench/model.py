"""Forward-pass benchmark of our MPRNet beside the reference implementation (spandrel's), same weights.

Every combination of the given configurations, input sizes, batch sizes, precisions, memory formats
and compile settings is timed for both implementations in the same run, and printed as a markdown
table (and written as JSON with --json). Examples:

    # CPU, tiny sizes (minutes on 2 cores)
    python bench/model.py --device cpu --config derain deblur --size 64 128 --batch 1 4
    # one GPU, a few minutes
    python bench/model.py --device cuda --config deblur denoise derain --size 256 --batch 1 8 32 \\
        --precision fp32 tf32 bf16 --memory-format channels_last
    # CPU engines side by side (our model on torch eager, and on OpenVINO), bundled weights
    python bench/model.py --device cpu --impl ours --engine torch openvino --config bundled-denoise --size 256 512

`--engine openvino` adds a row per case for the same weights on the OpenVINO engine (model/engine_openvino.py,
fp32, its static shape compiled during the first call), timed in turn with the others; "vs torch" is its
speed over our model on torch ("ours"). Configurations named bundled-<task> use the bundled weights.

Timing: CUDA events around each forward pass after warm-up (CUDA), time.perf_counter (CPU); the
figure is the median of --repeats passes. FLOPs: torch.utils.flop_counter.FlopCounterMode on the
meta device (shape-only; 2 FLOPs per multiply-add). Peak memory above the level before the timed
passes (weights and input excluded): torch.cuda.max_memory_allocated on CUDA; on the CPU the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus its RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reference import reference_mprnet
from model.arch import MPRNet
from model.bundled import bundled_weights
from model.checkpoint import load_mprnet
from model.engine_api import build_engine
from model.variants import TASKS, TINY, VARIANTS, config_from_state_dict

CONFIGS = {**VARIANTS, "tiny": TINY}
BUNDLED = {f"bundled-{t}": t for t in TASKS}
ENGINES = ("torch", "openvino")  # torch: the "ours" rows
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("ours", "reference")


# ---------------------------------------------------------------- memory


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


class PeakMemory:
    """Peak memory above the level at `start()`, in MiB (see the module docstring for the method)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "cuda: torch.cuda.max_memory_allocated minus memory_allocated before"
        else:
            self.method = "cpu: peak RSS (VmHWM after reset via /proc/self/clear_refs) minus RSS before"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap, so that RSS is what is in use
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.before = _proc_status_mib("VmRSS")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        return max(0.0, _proc_status_mib("VmHWM") - self.before)


# ---------------------------------------------------------------- one case


def count_flops(impl: str, config: dict, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass at `shape`, counted on the meta device (no compute, no memory)."""
    with torch.device("meta"):
        model = MPRNet(**config) if impl == "ours" else reference_mprnet(**config)
        x = torch.empty(shape)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def build(impl: str, config: dict, state_dict: dict, device: torch.device, channels_last: bool, compile_mode: str):
    model = MPRNet(**config) if impl == "ours" else reference_mprnet(**config)
    model.load_state_dict(state_dict, strict=True)
    model = model.eval().to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile_mode != "none":
        model = torch.compile(model, mode=compile_mode)
    return model


class Case:
    """One implementation ready to run: its forward pass under the case's precision and compile mode."""

    def __init__(self, model, x: torch.Tensor, precision: str, compile_mode: str) -> None:
        self.model, self.x, self.compile_mode = model, x, compile_mode
        self.autocast_dtype = AUTOCAST.get(precision)
        self.times: list[float] = []

    def forward(self) -> torch.Tensor:
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new step may reuse output memory
        autocast = (torch.autocast(self.x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.model(self.x)[0]

    def timed(self) -> None:
        if self.x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.forward()
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            self.forward()
            self.times.append(time.perf_counter() - t)


class EngineCase(Case):
    """Our model on another engine (fp32): its run_batch is the forward pass."""

    def __init__(self, engine, x: torch.Tensor) -> None:
        super().__init__(None, x, "fp32", "none")
        self.engine = engine

    def forward(self) -> torch.Tensor:
        return self.engine.run_batch(self.x)


def config_and_weights(name: str, seed: int) -> tuple[dict, dict]:
    """The configuration and state dict of a named config: bundled weights, else default-init random weights."""
    if name in BUNDLED:
        sd = load_mprnet(bundled_weights(BUNDLED[name])).state_dict()
        return config_from_state_dict(sd), sd
    torch.manual_seed(seed)
    return CONFIGS[name], MPRNet(**CONFIGS[name]).state_dict()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict[str, Case], warmup: int, repeats: int, memory: PeakMemory) -> dict[str, dict]:
    """First call (compiles when compiling), warm-up, then timed passes of all implementations in
    turn (ours, reference, ours, ...) so that a change in machine load hits them alike; finally one
    pass each under the memory probe."""
    out: dict[str, dict] = {}
    for impl, case in cases.items():
        t0 = time.perf_counter()
        y = case.forward().float().clone()  # kept for the comparison of the implementations
        _sync(case.x.device)
        out[impl] = {"out": y, "first_call_s": time.perf_counter() - t0}
        for _ in range(warmup):
            case.forward()
        _sync(case.x.device)
    for _ in range(repeats):
        for case in cases.values():
            case.timed()
    for impl, case in cases.items():
        memory.start()
        case.forward()
        out[impl].update(median_s=statistics.median(case.times), min_s=min(case.times), peak_mib=memory.stop())
    return out


# ---------------------------------------------------------------- the run


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["derain"], choices=[*CONFIGS, *BUNDLED],
                   help="released variant(s) (random weights), tiny, or bundled-<task> (the bundled weights)")
    p.add_argument("--size", nargs="+", type=_size, default=[(64, 64)], help="input H or HxW (multiples of 8)")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "tf32", "bf16", "fp16"],
                   help="fp32 (TF32 off), tf32 (fp32 with TF32 convs/matmuls, CUDA), bf16/fp16 autocast; "
                        "auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--memory-format", nargs="+", default=["auto"], choices=["auto", "contiguous", "channels_last"],
                   help="auto: channels_last on CUDA, contiguous on CPU")
    p.add_argument("--compile", nargs="+", default=["none"], choices=["none", "default", "reduce-overhead"])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--engine", nargs="+", default=["torch"], choices=ENGINES,
                   help="engines to run our model on (CPU, fp32): torch is the 'ours' rows")
    p.add_argument("--cache-dir", help="keeps the OpenVINO engine's export and compiled shapes between runs")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes after the first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def machine(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    with contextlib.suppress(OSError):
        info["load_average_1m"] = os.getloadavg()[0]  # other work on the machine skews CPU figures
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [("bf16" if cuda else "fp32") if p == "auto" else p for p in args.precision]
    if not cuda and {"tf32", "fp16"} & set(precisions):
        raise SystemExit("bench: tf32 and fp16 need CUDA; use fp32 or bf16 on the CPU")
    formats = [("channels_last" if cuda else "contiguous") if f == "auto" else f for f in args.memory_format]
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats if args.repeats is not None else (20 if cuda else 3)
    memory = PeakMemory(device)
    results = []
    extra_engines = [e for e in args.engine if e != "torch"]
    if extra_engines and cuda:
        raise SystemExit("bench: --engine openvino runs on the CPU; use --device cpu")
    for name in args.config:
        config, weights = config_and_weights(name, args.seed)  # the same weights for every implementation
        engines = {}
        for engine in extra_engines:
            net = MPRNet(**config)
            net.load_state_dict(weights)
            engines[engine] = build_engine(net, engine, device="cpu", precision="fp32", threads=args.threads or 0,
                                           cache_dir=args.cache_dir, max_batch=max(args.batch))
        for (h, w) in args.size:
            for batch in args.batch:
                shape = (batch, config["in_c"], h, w)
                x = torch.rand(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
                for precision in dict.fromkeys(precisions):
                    for fmt in dict.fromkeys(formats):
                        layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                        xin = x.contiguous(memory_format=layout)
                        for compile_mode in args.compile:
                            cases = {
                                impl: Case(build(impl, config, weights, device, fmt == "channels_last", compile_mode),
                                           xin, precision, compile_mode)
                                for impl in args.impl
                            }
                            if precision == "fp32" and compile_mode == "none":
                                cases.update({e: EngineCase(engine, x) for e, engine in engines.items()})
                            if cuda:
                                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
                            timings = time_cases(cases, warmup, repeats, memory)
                            del cases
                            outs = {impl: t.pop("out") for impl, t in timings.items()}
                            ours = outs.get("ours")
                            both = ours is not None and "reference" in outs
                            diff = (ours - outs["reference"]).abs().max().item() if both else None
                            for impl, t in timings.items():
                                flops = count_flops("reference" if impl == "reference" else "ours", config, shape)
                                if impl in engines and ours is not None:
                                    # engines clamp to [0, 1] as the service does; the plain forward pass does not
                                    t["max_abs_diff_vs_torch"] = (outs[impl] - ours.clamp(0, 1)).abs().max().item()
                                sec = t["median_s"]
                                results.append({
                                    "impl": impl, "config": name, "height": h, "width": w, "batch": batch,
                                    "precision": precision, "memory_format": fmt, "compile": compile_mode,
                                    "images_per_s": batch / sec, "megapixels_per_s": batch * h * w / 1e6 / sec,
                                    "tflops_per_s": flops / sec / 1e12, "gflops_per_image": flops / batch / 1e9,
                                    **t, "repeats": repeats, "warmup": warmup, "max_abs_diff_vs_reference": diff,
                                })
    return {"machine": machine(device), "command": " ".join(["python", "bench/model.py", *argv]),
            "memory_method": memory.method, "timing": "cuda events" if cuda else "time.perf_counter", "results": results}


def markdown(report: dict[str, Any]) -> str:
    head = ("| impl | config | input | batch | precision | memory format | compile | median ms | img/s | MP/s "
            "| TFLOP/s | peak MiB | ours/ref | max abs diff | vs torch | diff vs torch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    def case(r: dict) -> tuple:
        return r["config"], r["height"], r["width"], r["batch"], r["precision"], r["memory_format"], r["compile"]

    ref = {case(r): r for r in report["results"] if r["impl"] == "reference"}
    ours = {case(r): r for r in report["results"] if r["impl"] == "ours"}
    for r in report["results"]:
        key = case(r)
        ratio = f"{r['images_per_s'] / ref[key]['images_per_s']:.2f}x" if r["impl"] == "ours" and key in ref else ""
        engine = r["impl"] not in IMPLS and key in ours
        vs_torch = f"{r['images_per_s'] / ours[key]['images_per_s']:.2f}x" if engine else ""
        diff_torch = f"{r['max_abs_diff_vs_torch']:.1e}" if engine else ""
        has_ref = r["max_abs_diff_vs_reference"] is not None and r["impl"] == "ours"
        diff = f"{r['max_abs_diff_vs_reference']:.1e}" if has_ref else ""
        lines.append(
            f"| {r['impl']} | {r['config']} | {r['height']}x{r['width']} | {r['batch']} | {r['precision']} "
            f"| {r['memory_format']} "
            f"| {r['compile']} | {r['median_s'] * 1e3:.1f} | {r['images_per_s']:.2f} | {r['megapixels_per_s']:.3g} "
            f"| {r['tflops_per_s']:.3g} | {r['peak_mib']:.1f} | {ratio} | {diff} | {vs_torch} | {diff_torch} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = run(args, argv)
    print(markdown(report))
    m = report["machine"]
    print(f"\n{m.get('gpu') or m.get('cpu')}, torch {m['torch']}, {m['threads']} threads; timing: {report['timing']}; "
          f"memory: {report['memory_method']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
