"""`mprnet` command line: restore images (train and evaluate are added by their modules)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from .variants import TASKS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}


def _collect(inputs: Iterable[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input root) for every image under the given files and folders."""
    found = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise SystemExit(f"mprnet: no such file or folder: {p}")
    return found


def _destinations(files: list[tuple[Path, Path]], output: str, overwrite: bool) -> list[tuple[Path, Path]]:
    """(input, output file) for every image, or SystemExit with one line for an output that cannot work:
    before any weights are loaded or image restored."""
    out = Path(output)
    one_file = len(files) == 1 and out.suffix.lower() in IMAGE_SUFFIXES
    if one_file and out.is_dir():
        example = out / files[0][1].name
        raise SystemExit(f"mprnet: -o {out} is a folder; name the output file (e.g. {example}) or a suffixless folder")
    if not one_file and out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        raise SystemExit(f"mprnet: -o {out} names a file, but {len(files)} images need an output folder")
    if not one_file and out.exists() and not out.is_dir():
        raise SystemExit(f"mprnet: -o {out} is an existing file; {len(files)} images need an output folder")
    folder = out.parent if one_file else out
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise SystemExit(f"mprnet: -o {out} cannot be written: {blocking} is a file, not a folder")
    pairs = [(src, out if one_file else out / rel) for src, rel in files]
    by_destination: dict[Path, Path] = {}
    for src, dst in pairs:
        earlier = by_destination.setdefault(dst.resolve(), src)
        if earlier != src:
            raise SystemExit(f"mprnet: {earlier} and {src} would both be written to {dst}")
    same = [src for src, dst in pairs if dst.exists() and os.path.samefile(src, dst)]
    if same and not overwrite:
        more = f" (and {len(same) - 1} more)" if len(same) > 1 else ""
        raise SystemExit(f"mprnet: the output would overwrite the input {same[0]}{more}; --overwrite allows it")
    return pairs


def _save(result, dst: Path, icc: bytes | None) -> None:
    """Write `result` in the format of `dst`'s suffix, through a temporary file: a failed write leaves no
    partial file and, with --overwrite, the input as it was."""
    from PIL import Image

    from .images import for_format

    fmt = Image.registered_extensions()[dst.suffix.lower()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.mprnet-partial")
    try:
        for_format(result, fmt).save(tmp, fmt, **({"icc_profile": icc} if icc else {}))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    from .engine_api import ENGINES

    env = os.environ.get
    p.add_argument("--engine", default=env("MPRNET_ENGINE", "auto"), choices=ENGINES,
                   help="auto (OpenVINO on the CPU when installed, else torch), torch, openvino ($MPRNET_ENGINE)")
    p.add_argument("--threads", type=int, default=int(env("MPRNET_TORCH_THREADS") or 0),
                   help="CPU threads for the model (0: the runtime's default; $MPRNET_TORCH_THREADS)")
    p.add_argument("--cache-dir", default=env("MPRNET_COMPILE_CACHE_DIR") or str(Path.home() / ".cache" / "mprnet"),
                   help="keeps exported and compiled models across runs ($MPRNET_COMPILE_CACHE_DIR or ~/.cache/mprnet)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tile", type=int, default=512, help="tile size for large images (multiple of 8)")
    p.add_argument("--tile-overlap", type=int, default=32, help="overlap between tiles (multiple of 8)")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per forward pass")


def cmd_restore(args: argparse.Namespace) -> int:
    from PIL import Image, ImageOps
    from tqdm import tqdm

    from .bundled import bundled_weights
    from .checkpoint import CheckpointError
    from .inference import TileSettings, load_restorer

    files = _collect(args.inputs)
    if not files:
        raise SystemExit("mprnet: no images found (PNG, JPEG, WebP, TIFF, BMP)")
    pairs = _destinations(files, args.output, args.overwrite)
    try:
        weights = Path(args.weights) if args.weights else bundled_weights(args.task)
        tiles = TileSettings(args.tile, args.tile_overlap, args.tile_batch)
        restorer = load_restorer(weights, args.device, args.precision, tiles, engine=args.engine, threads=args.threads,
                                 cache_dir=args.cache_dir)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"mprnet: {e}") from None
    engine = f"{restorer.name}, {restorer.precision}"
    print(f"mprnet: {args.task} with {weights} on {restorer.device} ({engine})", file=sys.stderr)
    failed = 0
    # what a bad file raises from Pillow or from reading its mode; each is one line, and the run goes on
    unreadable = (OSError, ValueError, TypeError, SyntaxError, EOFError, struct.error, MemoryError)
    unreadable += (Image.DecompressionBombError,)
    for src, dst in tqdm(pairs, disable=len(pairs) < 2 or None, unit="img"):
        try:
            with Image.open(src) as im:
                icc = im.info.get("icc_profile")
                im = ImageOps.exif_transpose(im)
                result = restorer.restore(im)
        except unreadable as e:
            print(f"mprnet: skipped {src}: {_one_line(e)}", file=sys.stderr)
            failed += 1
            continue
        try:
            _save(result, dst, icc)
        except (OSError, ValueError) as e:
            print(f"mprnet: could not write {dst}: {_one_line(e)}", file=sys.stderr)
            failed += 1
            continue
        if len(pairs) == 1:
            print(f"mprnet: wrote {dst}", file=sys.stderr)
    if failed:
        print(f"mprnet: {failed} of {len(files)} images could not be restored", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundled import bundled_weights
    from .checkpoint import CheckpointError, load_mprnet
    from .export import export

    try:
        weights = Path(args.weights) if args.weights else bundled_weights(args.task)
        model = load_mprnet(weights)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"mprnet: {e}") from None
    if args.weights:
        licence = "the licence of the weights file (not recorded in it): check it before you redistribute the export"
    else:
        licence = f"Apache-2.0: this project's own bundled weights (model/weights/{args.task}.md)"
    if args.format == "openvino" and importlib.util.find_spec("openvino") is None:
        raise SystemExit("mprnet: --format openvino needs the openvino package: pip install 'mprnet-serve[openvino]'")
    try:
        written = export(model, args.format, args.output, task=args.task, weights=str(weights), licence=licence)
    except OSError as e:
        raise SystemExit(f"mprnet: could not write to {args.output}: {_one_line(e)}") from None
    for path in written:
        print(f"mprnet: wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mprnet", description="MPRNet image restoration (deblur, derain, denoise)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("restore", help="restore image files or folders")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--weights", help="checkpoint (.pth of the release, plain state dict, .safetensors, "
                                     "or mprnet train's last.pt / best.pt); default: bundled")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or folder (same names)")
    p.add_argument("--overwrite", action="store_true", help="let outputs replace input files (same path in and out)")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("export", help="write the model as ONNX or OpenVINO IR (dynamic size) with a model card")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--weights", help="checkpoint to export (default: the bundled weights)")
    p.add_argument("--format", required=True, choices=["onnx", "openvino"])
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Sub-commands that live in their own modules (train, evaluate), registered when present."""
    import importlib

    for name in ("train", "evaluate", "photos"):
        try:
            module = importlib.import_module(f"{__package__}.training.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.training.{name}":
                raise
            continue
        yield module.register_cli


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
