"""What bounding the decode costs, and what it saves.

Part 1 times `service.codec.decode` on crafted files of the kinds that used to hold a decode thread
(many TIFF directories, GIF frames, PNG chunks, JPEG markers or scans) or pass as a large job (a
truncated file declaring 25 MP), and prints each outcome. Part 2 times ordinary images three ways,
interleaved: Pillow alone (open, load, to tensor), `structure.check` alone, and `codec.decode` (the
checks, the budgeted reads and the marked rows included), the fastest and the median of `--repeat`
runs each (on a machine shared with other work the fastest run is the steadier figure).

    python -m bench.decode                 # both parts
    python -m bench.decode --repeat 50     # steadier medians on a busy machine
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
from PIL import Image

from model.images import to_tensor
from service import codec, structure
from service.errors import ServiceError
from tests.service import crafted


def _timed(fn, *args) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        outcome = f"200 {tuple(out.image.shape[1:])}" if isinstance(out, codec.Decoded) else "ok"
    except ServiceError as e:
        outcome = f"{e.status} {e.detail[:90]}"
    return time.perf_counter() - t0, outcome


def crafted_cases() -> dict[str, bytes]:
    return {
        "TIFF, 5,000 chained directories": crafted.tiff_chain(5000),
        "GIF, 100,000 frames": crafted.gif_frames(100_000),
        "PNG, 100,000 empty chunks": crafted.png_with_chunks(100_000),
        "JPEG, 100,000 APP markers": crafted.jpeg_with_segments(100_000),
        "JPEG, last scan repeated 10,000 times": crafted.jpeg_with_scans(10_000),
        "PNG declaring 5000x5000, 3 rows of data": crafted.png_short_stream(5000, 5000),
        "JPEG declaring 5000x5000, cut + EOI": crafted.jpeg_declaring(5000, 5000),
    }


def photo_like(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], axis=2)
    noise = np.random.default_rng(0).integers(-12, 13, (h, w, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def pillow_alone(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        to_tensor(img, keep_uint8=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    print(f"# {platform.machine()}, {platform.processor() or '?'}, Pillow {Image.__version__}")
    print("\n## crafted files through codec.decode (25 MP cap, 10 s budget)\n")
    print("| file | size | time | outcome |\n|---|---|---|---|")
    for name, data in crafted_cases().items():
        elapsed, outcome = _timed(codec.decode, data, 25_000_000)
        print(f"| {name} | {len(data) / 1e6:.2f} MB | {elapsed * 1e3:.1f} ms | {outcome} |")
    print(f"\n## ordinary images, ms: fastest / median of {args.repeat} (interleaved)\n")
    print("| image | bytes | Pillow alone | structure.check | codec.decode | decode / Pillow (fastest) |")
    print("|---|---|---|---|---|---|")
    for (h, w) in ((256, 256), (2000, 2000)):
        arr = photo_like(h, w)
        for fmt, save in (("PNG", {}), ("JPEG", {"quality": 90}), ("JPEG", {"quality": 90, "progressive": True})):
            data = crafted.encoded(arr, fmt, **save)
            times: dict[str, list[float]] = {"pillow": [], "check": [], "decode": []}
            for _ in range(args.repeat):
                times["pillow"].append(_timed(pillow_alone, data)[0])
                times["check"].append(_timed(structure.check, data)[0])
                times["decode"].append(_timed(codec.decode, data, 25_000_000)[0])
            fast = {k: min(v) * 1e3 for k, v in times.items()}
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = " | ".join(f"{fast[k]:.3f} / {med[k]:.3f}" for k in ("pillow", "check", "decode"))
            label = f"{w}x{h} {fmt}{' progressive' if save.get('progressive') else ''}"
            print(f"| {label} | {len(data):,} | {cells} | {fast['decode'] / fast['pillow']:.2f} |")


if __name__ == "__main__":
    main()
