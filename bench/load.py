"""HTTP load benchmark of the service, in the manner of Triton's perf_analyzer.

A closed-loop concurrency sweep (each of C clients sends its next request as soon as its last one is
answered), or a fixed request rate (`--rate`, open loop), over a mix of image sizes. Per level:
throughput, end-to-end latency p50/p95/p99, the server's own queue and inference time (from its
`Server-Timing` header) and the HTTP overhead = end-to-end minus (queue + inference): everything that
is not the model or waiting for it (upload, decode, padding/tiling, blending, encode, download).

`--protocol v2` sends the same images through the Open Inference Protocol (KServe v2) instead, as
`tritonclient` sends real payloads: UINT8 pixels [H, W, 3] as a binary tensor, the restored pixels asked
back as binary; `--protocol both` measures each level with both, one after the other.

`--overload F` then runs F times the saturation concurrency (the smallest level of the sweep within
10 % of its best throughput) for `--duration`, all clients starting at once, each waiting out a 429's
or 503's Retry-After before its next request, and reports the status mix and the time to each answer
per status: what an overloaded server tells its clients, and how soon (first protocol only).

`--raw` first measures the model alone, in this process, on exactly the items the service would
run for the same mix (same planner, same batch size, 8-bit items moved and converted by the service's
device worker as in the service), so "throughput at saturation / raw model throughput" says what the
service costs. Run it while nothing else uses the device.

The client (`--client`) is by default `raw`: a minimal HTTP/1.1 keep-alive client on asyncio streams
(`RawClient`), about 0.4 ms per round trip on the 2-core CPU of docs/performance.md, where httpx
takes about 2 ms of the client's own CPU for the same request. Like perf_analyzer (C++), it keeps the
client's cost out of what is reported as the server's overhead; `--client httpx` measures with httpx.

    python -m bench.load --spawn --weights model/weights --task denoise \\
        --sizes 256x256 --concurrency 1,2,4,8 --duration 20 --raw     # --weights tiny: a stated small model
    python -m bench.load --url http://127.0.0.1:8000 --task deblur --rate 2 --duration 30
    python -m bench.load --spawn --weights tiny --sizes 256x256 --concurrency 1,8 --protocol both
    python -m bench.load --spawn --weights tiny --sizes 256x256 --concurrency 1,2,4 --overload 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "model" / "samples" / "coffee_noisy.png"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'256x256,640x480' -> [(256, 256), (640, 480)] as (width, height)."""
    out = []
    for part in text.split(","):
        w, _, h = part.strip().partition("x")
        out.append((int(w), int(h or w)))
    return out


def make_images(sizes: list[tuple[int, int]]) -> list[bytes]:
    """PNGs of a real photo (resized and cropped), so decode/encode cost is that of photos, not noise."""
    photo = Image.open(SAMPLE).convert("RGB")
    images = []
    for w, h in sizes:
        scale = max(w / photo.width, h / photo.height)
        target = (max(w, round(photo.width * scale)), max(h, round(photo.height * scale)))
        resized = photo.resize(target, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        resized.crop((0, 0, w, h)).save(buf, "PNG")
        images.append(buf.getvalue())
    return images


@dataclass
class Call:
    """One request as sent: path under the server, body, headers, and the image's pixel count."""

    path: str
    body: bytes
    headers: dict[str, str]
    pixels: int


def native_calls(task: str, images: list[bytes], sizes: list[tuple[int, int]]) -> list[Call]:
    headers = {"content-type": "image/png"}
    return [Call(f"/restore/{task}", png, headers, w * h) for png, (w, h) in zip(images, sizes, strict=True)]


def v2_calls(task: str, images: list[bytes], sizes: list[tuple[int, int]]) -> list[Call]:
    """The binary tensor form of the Open Inference Protocol: the JSON, then the image's pixels."""
    calls = []
    for png, (w, h) in zip(images, sizes, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (h, w, 3) uint8
        size = {"binary_data_size": pixels.nbytes}
        tensor = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape), "parameters": size}
        wanted = {"name": "restored", "parameters": {"binary_data": True}}
        head = json.dumps({"inputs": [tensor], "outputs": [wanted]}).encode()
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
        calls.append(Call(f"/v2/models/{task}/infer", head + pixels.tobytes(), headers, w * h))
    return calls


@dataclass
class Sample:
    e2e: float
    status: int
    timing: dict[str, float] = field(default_factory=dict)  # ms, from Server-Timing
    pixels: int = 0
    retry_after: float = 0.0  # s, from a refusal's Retry-After


def parse_server_timing(header: str | None) -> dict[str, float]:
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            out[name] = float(rest)
    return out


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]  # lower-case names
    content: bytes


class RawClient:
    """The smallest HTTP/1.1 client that can drive the service: keep-alive connections from a pool,
    Content-Length or chunked answers. Raises OSError (or asyncio.IncompleteReadError, a subclass of
    EOFError) when a connection fails; a failed connection is dropped, not reused."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> RawResponse:
        u = httpx.URL(url)
        key = (u.host, u.port or 80)
        pool = self._idle.setdefault(key, [])
        while pool and pool[-1][0].at_eof():  # the server closed it while idle (its keep-alive timeout)
            pool.pop()[1].close()
        if pool:
            try:
                return await self._exchange(*pool.pop(), pool, u, content, headers)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                if getattr(e, "partial", b""):
                    raise  # part of an answer came: the server did see the request
                # no answer at all: a kept-alive connection the server closed as the request went out; once
                # more on a new connection, as HTTP clients do (RFC 9112, section 9.3.1)
        return await self._exchange(*await asyncio.open_connection(*key), pool, u, content, headers)

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pool: list, u: httpx.URL,
                        content: bytes, headers: dict[str, str]) -> RawResponse:
        try:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            target = u.raw_path.decode("ascii")
            start = f"POST {target} HTTP/1.1\r\nhost: {u.host}\r\ncontent-length: {len(content)}\r\n{head}\r\n"
            writer.write(start.encode("latin-1") + content)
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            got = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            if got.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    body += (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")
            else:
                body = await reader.readexactly(int(got.get("content-length", "0")))
        except BaseException:
            writer.close()
            raise
        if got.get("connection", "").lower() == "close":
            writer.close()
        else:
            pool.append((reader, writer))
        return RawResponse(int(status_line.split()[1]), got, body)


def make_client(kind: str, connections: int):
    if kind == "raw":
        return RawClient()
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def one(client, url: str, call: Call) -> Sample:
    start = time.perf_counter()
    try:
        r = await client.post(url + call.path, content=call.body, headers=call.headers)
        status, timing = r.status_code, parse_server_timing(r.headers.get("server-timing"))
        retry = float(r.headers.get("retry-after", "0") or 0)
    except (httpx.HTTPError, OSError, EOFError, ValueError):
        status, timing, retry = 0, {}, 0.0
    return Sample((time.perf_counter() - start) * 1000, status, timing, call.pixels, retry)


async def closed_loop(
    url: str, calls: list[Call], concurrency: int, duration: float, max_requests: int, on_start=None,
    client_kind: str = "raw",
) -> tuple[list[Sample], float]:
    """Returns the samples and the elapsed time (the warm-up requests excluded)."""
    samples: list[Sample] = []
    async with make_client(client_kind, concurrency) as client:
        # warm the connections and the server's queue once per client
        await asyncio.gather(*(one(client, url, calls[i % len(calls)]) for i in range(concurrency)))
        if on_start:
            on_start()
        start = time.perf_counter()
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.perf_counter() - start < duration:
                n = next(counter)
                if n >= max_requests:
                    return
                samples.append(await one(client, url, calls[n % len(calls)]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - start


async def fixed_rate(
    url: str, calls: list[Call], rate: float, duration: float, client_kind: str = "raw"
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    async with make_client(client_kind, 256) as client:
        start, pending, n = time.perf_counter(), [], 0
        while (due := start + n / rate) < start + duration:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            pending.append(asyncio.create_task(one(client, url, calls[n % len(calls)])))
            n += 1
        samples = list(await asyncio.gather(*pending))
        return samples, time.perf_counter() - start


async def overload(
    url: str, calls: list[Call], clients: int, duration: float, client_kind: str = "raw"
) -> tuple[list[Sample], float]:
    """`clients` closed-loop clients started at once (no warm-up: the first wave is a burst); a client
    that is refused waits the answer's Retry-After (at most what is left of `duration`) before trying again."""
    samples: list[Sample] = []
    async with make_client(client_kind, clients) as client:
        start = time.perf_counter()
        counter = iter(range(10**9))

        async def worker() -> None:
            while (left := duration - (time.perf_counter() - start)) > 0:
                sample = await one(client, url, calls[next(counter) % len(calls)])
                samples.append(sample)
                if sample.status in (429, 503):
                    await asyncio.sleep(min(sample.retry_after or 1.0, max(0.0, left)))

        await asyncio.gather(*(worker() for _ in range(clients)))
        return samples, time.perf_counter() - start


def status_mix(samples: list[Sample], elapsed: float) -> list[dict[str, float | str]]:
    """Per status: how many, what share, and the time to the answer (p50, p95, max)."""
    rows = []
    for status in sorted({s.status for s in samples}):
        ms = np.array([s.e2e for s in samples if s.status == status])
        rows.append({
            "status": str(status or "failed"), "answers": len(ms), "share %": 100 * len(ms) / len(samples),
            "per s": len(ms) / elapsed, "p50 ms": float(np.percentile(ms, 50)), "p95 ms": float(np.percentile(ms, 95)),
            "max ms": float(ms.max()),
        })
    return rows


def saturation(rows: list[dict], levels: list[int]) -> int:
    """The smallest concurrency whose throughput is within 10 % of the sweep's best."""
    best = max(float(r["req/s"]) for r in rows)
    return next(c for c, r in zip(levels, rows, strict=True) if float(r["req/s"]) >= 0.9 * best)


def device_seconds(url: str, task: str) -> float:
    """Total time the service's device has spent in batches (its inference histogram's sum)."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("mprnet_inference_duration_seconds_sum{") and f'task="{task}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def summarize(label: str, samples: list[Sample], elapsed: float, busy: float) -> dict[str, float | str]:
    ok = [s for s in samples if s.status == 200]
    e2e = np.array([s.e2e for s in ok]) if ok else np.zeros(1)

    def part(name: str) -> np.ndarray:
        return np.array([s.timing.get(name, 0) for s in ok]) if ok else np.zeros(1)

    queue, infer, dec, enc = part("queue"), part("inference"), part("decode"), part("encode")
    overhead = e2e - queue - infer

    def p(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q))

    return {
        "load": label,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "req/s": len(ok) / elapsed,
        "device busy %": 100 * busy / elapsed,
        "MP/s": sum(s.pixels for s in ok) / 1e6 / elapsed,
        "p50 ms": p(e2e, 50), "p95 ms": p(e2e, 95), "p99 ms": p(e2e, 99),
        "queue p50 ms": p(queue, 50), "inference p50 ms": p(infer, 50),
        "overhead p50 ms": p(overhead, 50), "overhead p95 ms": p(overhead, 95),
        # where the overhead goes: decoding, encoding, and the rest (HTTP, upload, download, client)
        "decode p50 ms": p(dec, 50), "encode p50 ms": p(enc, 50), "HTTP+client p50 ms": p(overhead - dec - enc, 50),
    }


def table(rows: list[dict]) -> str:
    keys = list(rows[0])

    def fmt(v: object) -> str:
        return (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def raw_throughput(weights: Path, task: str, sizes: list[tuple[int, int]], max_requests: int, repeats: int) -> float:
    """Requests per second of the model alone on the service's items for this mix: the best over batches
    of 1, 2, 4, ... up to `max_requests` requests' worth of items (a higher baseline is a harder target)."""
    import torch

    from model.checkpoint import load_mprnet
    from service.loading import engine_for
    from service.planner import Planner
    from service.settings import Settings
    from service.worker import DeviceWorker

    settings = Settings()  # the same MPRNET_* environment as the spawned server
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path = weights / f"{task}.safetensors" if weights.is_dir() else weights
    restorer = engine_for(settings, load_mprnet(path))  # the engine the spawned server runs
    planner = Planner(settings.buckets, settings.tile_size, settings.tile_overlap)
    worker = DeviceWorker({task: restorer}, restorer.device)  # its batch path: uint8 up, scaled and rounded on the device
    pixels = torch.Generator().manual_seed(0)
    # (N, 3, h, w) uint8 per request, as the service decodes and plans a PNG of that size
    items = [planner.plan(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=pixels)).inputs for w, h in sizes]
    best = 0.0
    for n in sorted({1 << i for i in range(max_requests.bit_length()) if 1 << i <= max_requests} | {max_requests}):
        seconds = []
        for x in items:
            group = x.repeat(n, 1, 1, 1)  # n requests' worth of this size's items
            per_batch = int(settings.batch_pixels(restorer.device.type) // (x.shape[2] * x.shape[3]))
            step = min(settings.max_batch_size, max(1, per_batch))
            worker.run_sync(task, group[:step].unbind(0))  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                for i in range(0, len(group), step):
                    worker.run_sync(task, group[i : i + step].unbind(0))
            seconds.append((time.perf_counter() - start) / repeats / n)
        best = max(best, 1.0 / float(np.mean(seconds)))
    worker.close()
    return best


def codec_cpu_ms(images: list[bytes], repeats: int = 30) -> tuple[float, float]:
    """CPU ms per request (mean over the mix) of the service's decode + plan and assemble + PNG encode,
    run here on one thread: what the HTTP path costs without waiting for a busy CPU."""
    import torch

    from service import codec
    from service.planner import Planner
    from service.settings import Settings

    torch.set_num_threads(1)
    settings = Settings()
    planner = Planner(settings.buckets, settings.tile_size, settings.tile_overlap)
    dec = enc = 0.0
    for data in images:
        decoded = codec.decode(data, settings.max_pixels)
        plan = planner.plan(decoded.image)
        start = time.thread_time()
        for _ in range(repeats):
            decoded = codec.decode(data, settings.max_pixels)
            plan = planner.plan(decoded.image)
        dec += (time.thread_time() - start) / repeats
        start = time.thread_time()
        for _ in range(repeats):
            # identity output: the input's content
            codec.encode(plan.assemble(list(plan.inputs)), decoded, "png", None, settings.png_effort)
        enc += (time.thread_time() - start) / repeats
    return 1000 * dec / len(images), 1000 * enc / len(images)


def spawn(weights: Path, task: str, port: int) -> subprocess.Popen:
    env = {"MPRNET_TASKS": task, **os.environ,
           "MPRNET_HOST": "127.0.0.1", "MPRNET_PORT": str(port), "MPRNET_LOG_LEVEL": "warning"}
    env.setdefault("MPRNET_WEIGHTS_DIR" if weights.is_dir() else f"MPRNET_WEIGHTS_{task.upper()}", str(weights))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready in 600 s")


def tiny_weights(task: str) -> Path:
    """A seeded random checkpoint of the TINY configuration (model/variants.py), for a stated small config."""
    import tempfile

    import torch

    from model.arch import MPRNet
    from model.checkpoint import save_safetensors
    from model.variants import TINY

    path = Path(tempfile.mkdtemp(prefix="mprnet-tiny-")) / f"{task}.safetensors"
    torch.manual_seed(0)
    save_safetensors(MPRNet(**TINY), path)
    return path.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (else --spawn)")
    ap.add_argument("--spawn", action="store_true", help="start `python -m service` on 127.0.0.1 (MPRNET_* from the environment)")
    ap.add_argument("--weights", default=str(ROOT / "model" / "weights"),
                    help="weights file or directory (for --spawn and --raw); 'tiny': a seeded TINY model")
    ap.add_argument("--task", default="denoise")
    ap.add_argument("--sizes", default="256x256", help="image mix, WIDTHxHEIGHT comma list, sent round-robin")
    ap.add_argument("--concurrency", default="1,2,4,8", help="closed-loop client counts")
    ap.add_argument("--rate", type=float, help="fixed request rate (req/s, open loop) instead of the sweep")
    ap.add_argument("--duration", type=float, default=20, help="seconds per level")
    ap.add_argument("--max-requests", type=int, default=2000, help="cap per level")
    ap.add_argument("--overload", type=float, metavar="F", help="after the sweep, run F x the saturation concurrency")
    ap.add_argument("--raw", action="store_true", help="measure the model alone first (before the server starts)")
    ap.add_argument("--raw-repeats", type=int, default=5)
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="HTTP client: raw (minimal, about 0.4 ms per request) or httpx (about 2 ms)")
    ap.add_argument("--protocol", choices=["native", "v2", "both"], default="native",
                    help="native: POST /restore/{task} with PNG; v2: Open Inference Protocol, binary UINT8 tensors")
    args = ap.parse_args(argv)

    args.weights = tiny_weights(args.task) if args.weights == "tiny" else Path(args.weights)
    sizes = parse_sizes(args.sizes)
    images = make_images(sizes)
    protocols = ["native", "v2"] if args.protocol == "both" else [args.protocol]
    calls = {"native": native_calls(args.task, images, sizes), "v2": v2_calls(args.task, images, sizes)}
    levels = [int(c) for c in args.concurrency.split(",")]
    raw = raw_throughput(args.weights, args.task, sizes, max(levels), args.raw_repeats) if args.raw else None

    proc = None
    url = args.url
    if args.spawn:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = spawn(args.weights, args.task, port)
        url = f"http://127.0.0.1:{port}"
    if not url:
        ap.error("give --url or --spawn")
    rows = []
    try:
        for c, protocol in [(c, p) for c in ([None] if args.rate else levels) for p in protocols]:
            mark = [device_seconds(url, args.task)]
            if c is None:
                samples, elapsed = asyncio.run(fixed_rate(url, calls[protocol], args.rate, args.duration, args.client))
            else:
                def reset(mark: list[float] = mark) -> None:  # once the warm-up requests are done
                    mark[0] = device_seconds(url, args.task)

                run = closed_loop(url, calls[protocol], c, args.duration, args.max_requests, reset, args.client)
                samples, elapsed = asyncio.run(run)
            busy = device_seconds(url, args.task) - mark[0]
            label = f"{args.rate:g} req/s" if c is None else f"C={c}"
            rows.append(summarize(label if len(protocols) == 1 else f"{label} {protocol}", samples, elapsed, busy))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.overload and not args.rate:
            knee = saturation(rows[:: len(protocols)], levels)  # the first protocol's rows, one per level
            clients = max(1, round(args.overload * knee))
            samples, elapsed = asyncio.run(overload(url, calls[protocols[0]], clients, args.duration, args.client))
            mix = status_mix(samples, elapsed)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"task {args.task}; sizes {args.sizes}; client {args.client}; protocol {args.protocol}")
    print(table(rows))
    if args.overload and not args.rate:
        print(f"\noverload: {clients} clients ({args.overload:g} x the saturation concurrency {knee}, "
              f"{protocols[0]}) for {elapsed:.1f} s; a refused client waits its Retry-After")
        print(table(mix))
    dec, enc = codec_cpu_ms(images)
    print(f"\ncodec CPU per request, one thread, no load from this benchmark: "
          f"decode+plan {dec:.1f} ms, assemble+PNG encode {enc:.1f} ms")
    if raw is not None:
        after = raw_throughput(args.weights, args.task, sizes, max(levels), args.raw_repeats)
        best = max(float(r["req/s"]) for r in rows)
        print(f"\nraw model throughput (same items, in-process): {raw:.2f} req/s before the sweep, {after:.2f} after; "
              f"service at best: {best:.2f} req/s = {200 * best / (raw + after):.0f}% of their mean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
