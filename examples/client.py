#!/usr/bin/env python3
"""Restore a folder of images through the mprnet-serve HTTP API: a client to copy into a photo backend.

    python examples/client.py photos/ -o restored/ --task denoise --url http://127.0.0.1:8000

What it shows:
- bounded concurrency: N workers share one connection pool of N connections;
- 429 (busy) and 503 (not ready, draining) are retried, waiting as long as the server's Retry-After
  says (else exponential backoff with jitter), a bounded number of times; network errors likewise;
- file names are kept: photos/a/b.jpg -> restored/a/b.jpg (the suffix changes only with the format);
- a progress bar, a summary, and exit status 1 when any image failed (2 for a usage error).

Needs httpx and tqdm (`pip install httpx tqdm`), nothing from this repository.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
from tqdm import tqdm

TASKS = ("deblur", "derain", "denoise")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
SUFFIX_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
FORMAT_SUFFIXES = {"image/png": (".png",), "image/jpeg": (".jpg", ".jpeg"), "image/webp": (".webp",)}
RETRY_STATUSES = {429, 503}  # busy, or not ready / draining: the same request will work later
FATAL_STATUSES = {401, 403, 404}  # bad token or unknown task: every other image would fail the same way


@dataclass(frozen=True)
class Options:
    url: str
    task: str
    format: str | None = None  # None: the input's own format where the API can write it, else PNG
    quality: int | None = None
    token: str | None = None
    concurrency: int = 4
    retries: int = 5  # extra attempts per image after the first
    max_wait: float = 60.0  # the longest single wait between attempts, in seconds
    timeout: float = 300.0  # per request: a large image on a CPU server takes a while
    deadline: float | None = None  # X-Request-Timeout: the server answers 504 if compute cannot start by then


@dataclass
class Outcome:
    source: Path
    output: Path | None = None
    error: str | None = None
    attempts: int = 0
    status: int | None = None  # the last HTTP status; None when none came back


def find_images(inputs: Sequence[str], out_dir: Path) -> list[tuple[Path, Path]]:
    """(file, path relative to its input folder) for every image, skipping anything under out_dir."""
    out = out_dir.resolve()
    found = []
    for name in inputs:
        root = Path(name)
        if root.is_file():
            found.append((root, Path(root.name)))
            continue
        if not root.is_dir():
            raise SystemExit(f"client: no such file or folder: {root}")
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and out not in f.resolve().parents:
                found.append((f, f.relative_to(root)))
    return found


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is delay-seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def retry_delay(response: httpx.Response | None, attempt: int, max_wait: float) -> float:
    """Seconds to wait before the next attempt (attempt counts from 0)."""
    server_says = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
    if server_says is not None:
        # A little jitter on top, so clients told the same number do not all return at once.
        return min(max_wait, server_says * random.uniform(1.0, 1.1))
    return min(max_wait, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)


def describe(response: httpx.Response) -> str:
    """'HTTP 413 too_large: <the server's plain-language message>'."""
    try:
        body = response.json()
        detail, code = body.get("detail", ""), body.get("code", "")
    except ValueError:
        detail, code = response.text[:200], ""
    return " ".join(str(part) for part in (f"HTTP {response.status_code}", code and f"{code}:", detail) if part)


def output_path(out_dir: Path, rel: Path, content_type: str) -> Path:
    """Keep the name; change the suffix only when the result is in another format than the input."""
    suffixes = FORMAT_SUFFIXES.get(content_type.split(";")[0].strip(), (".png",))
    return out_dir / (rel if rel.suffix.lower() in suffixes else rel.with_suffix(suffixes[0]))


async def restore_one(client: httpx.AsyncClient, opts: Options, src: Path, rel: Path, out_dir: Path) -> Outcome:
    data = await asyncio.to_thread(src.read_bytes)
    params: dict[str, str | int] = {"format": opts.format or SUFFIX_FORMAT.get(src.suffix.lower(), "png")}
    if opts.quality is not None:
        params["quality"] = opts.quality
    outcome = Outcome(src)
    while True:
        outcome.attempts += 1
        response = None
        try:
            response = await client.post(f"restore/{opts.task}", params=params, files={"image": (src.name, data)})
        except httpx.TransportError as e:
            outcome.error = f"network error: {type(e).__name__}: {e}"
        else:
            outcome.status = response.status_code
            if response.status_code == 200:
                dst = output_path(out_dir, rel, response.headers.get("Content-Type", ""))
                await asyncio.to_thread(_write_atomically, dst, response.content)
                return Outcome(src, dst, None, outcome.attempts, 200)
            outcome.error = describe(response)
            if response.status_code not in RETRY_STATUSES:
                return outcome
        if outcome.attempts > opts.retries:
            outcome.error += f" (gave up after {outcome.attempts} attempts)"
            return outcome
        await asyncio.sleep(retry_delay(response, outcome.attempts - 1, opts.max_wait))


def _write_atomically(dst: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated image that a re-run would take for a result.
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    part.write_bytes(data)
    os.replace(part, dst)


async def restore_folder(files: list[tuple[Path, Path]], out_dir: Path, opts: Options, progress: bool = True) -> list[Outcome]:
    """Restore every (file, relative path) into out_dir; one Outcome per file, in completion order."""
    outcomes: list[Outcome] = []
    pending = iter(files)  # shared by the workers: each takes the next file when it is free
    stop: list[str] = []  # set by the first fatal error (bad token, unknown task)
    headers = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
    if opts.deadline is not None:
        headers["X-Request-Timeout"] = f"{opts.deadline:g}"
    limits = httpx.Limits(max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency)
    base_url = opts.url.rstrip("/") + "/"
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=opts.timeout, limits=limits) as client:
        with tqdm(total=len(files), unit="img", disable=None if progress else True) as bar:

            async def worker() -> None:
                for src, rel in pending:
                    if stop:
                        outcomes.append(Outcome(src, error=f"not attempted: {stop[0]}"))
                        continue
                    outcome = await restore_one(client, opts, src, rel, out_dir)
                    outcomes.append(outcome)
                    bar.update(1)
                    if outcome.error:
                        bar.write(f"failed: {src}: {outcome.error}", file=sys.stderr)
                        if outcome.status in FATAL_STATUSES:
                            stop.append(outcome.error)

            await asyncio.gather(*(worker() for _ in range(max(1, min(opts.concurrency, len(files))))))
    return outcomes


def summarize(outcomes: list[Outcome], out_dir: Path, seconds: float) -> str:
    ok = [o for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    retried = sum(o.attempts - 1 for o in outcomes if o.attempts > 1)
    lines = [f"restored {len(ok)} of {len(outcomes)} images into {out_dir} in {seconds:.1f} s ({retried} retries)"]
    if failed:
        lines.append(f"{len(failed)} failed:")
        lines += [f"  {o.source}: {o.error}" for o in failed]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Restore a folder of images through the mprnet-serve API.")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="output folder: the same relative paths and names")
    p.add_argument("--task", choices=TASKS, default="denoise")
    p.add_argument(
        "--url", default=os.environ.get("MPRNET_URL", "http://127.0.0.1:8000"), help="service base URL (env MPRNET_URL)"
    )
    p.add_argument("--format", choices=("png", "jpeg", "webp"), help="result format (default: the input's, or PNG)")
    p.add_argument("--quality", type=int, help="JPEG/WebP quality, 1-100")
    p.add_argument("--token", default=os.environ.get("MPRNET_API_TOKEN"), help="bearer token (env MPRNET_API_TOKEN)")
    p.add_argument("-j", "--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--retries", type=int, default=5, help="extra attempts per image on 429/503/network errors (default 5)")
    p.add_argument("--max-wait", type=float, default=60.0, help="longest wait between attempts, seconds (default 60)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds (default 300)")
    p.add_argument(
        "--deadline", type=float, help="seconds the server may queue an image before giving up with 504 (X-Request-Timeout)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.retries < 0 or args.max_wait < 0 or (args.deadline is not None and args.deadline <= 0):
        p.error("--concurrency must be >= 1, --retries and --max-wait >= 0, --deadline > 0")
    if args.quality is not None and not 1 <= args.quality <= 100:
        p.error("--quality must be between 1 and 100")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output)
    files = find_images(args.inputs, out_dir)
    if not files:
        print(f"client: no images found in {' '.join(args.inputs)} ({', '.join(sorted(IMAGE_SUFFIXES))})", file=sys.stderr)
        return 2
    opts = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})  # the flags are named like the fields
    started = time.monotonic()
    outcomes = asyncio.run(restore_folder(files, out_dir, opts, progress=not args.no_progress))
    print(summarize(outcomes, out_dir, time.monotonic() - started), file=sys.stderr)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
