"""The GPU targets' table from one bench/gpu.sh run: $OUT/engine.json and $OUT/load.txt -> summary.md and summary.json.

Each goal takes the fastest engine mode measured for it (over the batches tried for "best batch"
goals) beside the fastest reference figure for the same goal and the target. The HTTP line divides
the load benchmark's best closed-loop throughput by the engine's throughput in the configuration the
server ran (same task, shape, batch and mode), measured in-process in the same run.

    python -m bench.gpu_report --out out --load-mode graphs --load-batch 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HTTP_TARGET = 0.9  # end-to-end throughput at saturation over the engine's


# bench/load.py's first columns: its per-level lines on stderr come without the table's header
LOAD_COLUMNS = ["load", "requests", "errors", "req/s"]


def load_table(text: str, header: list[str] | None = None) -> list[dict[str, str]]:
    """The closed-loop rows ("| C=8 | ...") of bench/load.py's markdown table, as {column: text};
    `header` names the leading columns of rows printed without a header line."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "load" or header is None:
            header = cells
            continue
        if cells[0].startswith("C=") and len(cells) >= len(header):
            rows.append(dict(zip(header, cells, strict=False)))
    return rows


def summarize(
    engine: dict[str, Any], load_text: str | None, load_mode: str, load_shape: tuple[str, int, int, int], load_err: str = ""
) -> dict[str, Any]:
    """The GPU targets from the engine report; the HTTP ratio from load.txt (or, when the load run was
    cut short before its table, the per-level lines of load.err)."""
    rows = [r for r in engine["rows"] if "img_per_s" in r]
    goals: dict[str, dict[str, Any]] = {}
    for r in engine["rows"]:
        g = goals.setdefault(r["goal"], {"goal": r["goal"], "target_img_per_s": r["target"], "ours": None, "reference": None})
        if "img_per_s" not in r:
            continue
        key = "reference" if r["mode"] == "reference" else "ours"
        if g[key] is None or r["img_per_s"] > g[key]["img_per_s"]:
            g[key] = {"img_per_s": r["img_per_s"], "mode": r["mode"], "batch": r["batch"]}
    for g in goals.values():
        ours, target = g["ours"], g["target_img_per_s"]
        g["met"] = None if ours is None or target is None else ours["img_per_s"] >= target
        g["vs_reference"] = ours["img_per_s"] / g["reference"]["img_per_s"] if ours and g["reference"] else None

    http: dict[str, Any] = {"target_ratio": HTTP_TARGET, "mode": load_mode, "shape": load_shape}
    if load_text is None:
        http["skipped"] = "no load.txt (the load stage did not run)"
    else:
        levels = load_table(load_text) or load_table(load_err, LOAD_COLUMNS)
        task, h, w, b = load_shape
        same = [r for r in rows if (r["task"], r["height"], r["width"], r["batch"], r["mode"]) == (task, h, w, b, load_mode)]
        http["levels"] = levels
        if levels and same:
            best = max(float(r["req/s"]) for r in levels)
            http.update(best_req_per_s=best, engine_img_per_s=same[0]["img_per_s"], ratio=best / same[0]["img_per_s"])
            http["met"] = http["ratio"] >= HTTP_TARGET
        else:
            http["skipped"] = (
                "no closed-loop rows in load.txt" if not levels else f"no engine figure for {load_shape} in mode {load_mode}"
            )
    checks = engine.get("checks", [])
    return {"environment": engine["environment"], "goals": list(goals.values()), "http": http, "psnr_checks": checks}


def torch_line(env: dict[str, Any]) -> str:
    """torch X, and the pinned version beside it when this machine runs another."""
    pinned = env.get("torch_pinned")
    same = pinned is None or env["torch"].split("+")[0] == pinned
    return f"torch {env['torch']}" + ("" if same else f" (the project pins {pinned})")


def markdown(s: dict[str, Any]) -> str:
    env = s["environment"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"Card: {env.get('gpu', env['device'])} ({torch_line(env)}, CUDA {env.get('cuda', '-')})",
        f"Weights: {env.get('weights', '-')}",
        "",
        "| goal | reference img/s | ours img/s | ours: mode, batch | x reference | target img/s | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in s["goals"]:
        ref, ours = g["reference"], g["ours"]
        how = f"{ours['mode']}, {ours['batch']}" if ours else "not measured"
        ratio = "-" if g["vs_reference"] is None else f"{g['vs_reference']:.2f}x"
        target = g["target_img_per_s"] or "-"
        measured = f"{fmt(ref and ref['img_per_s'])} | {fmt(ours and ours['img_per_s'])}"
        lines.append(f"| {g['goal']} | {measured} | {how} | {ratio} | {target} | {g['met']} |")
    h = s["http"]
    lines.append("")
    if "ratio" in h:
        task, height, width, batch = h["shape"]
        lines.append(
            f"HTTP at saturation: {h['best_req_per_s']:.1f} req/s over the engine's {h['engine_img_per_s']:.1f} img/s "
            f"({task} {width}x{height}, batch {batch}, {h['mode']}) = {100 * h['ratio']:.0f}% "
            f"(target {100 * HTTP_TARGET:.0f}%): met {h['met']}"
        )
    else:
        lines.append(f"HTTP load: {h['skipped']}")
    if s["psnr_checks"]:
        lines += ["", "| task | weights | mode | PSNR bf16 vs fp32 (dB) | >= 45 dB |", "|---|---|---|---|---|"]
        lines += [
            f"| {c['task']} | {c['weights']} | {c['mode']} ({c['precision']}) | {c['psnr_vs_fp32_db']:.1f} | {c['pass']} |"
            for c in s["psnr_checks"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--load-mode", default="graphs", help="the engine mode the load stage's server ran")
    ap.add_argument("--load-task", default="deblur")
    ap.add_argument("--load-size", type=int, default=256)
    ap.add_argument("--load-batch", type=int, default=32)
    args = ap.parse_args(argv)
    engine_json = args.out / "engine.json"
    if not engine_json.is_file():
        print(f"no {engine_json}: the engine stage did not run", file=sys.stderr)
        return 1
    load_txt, load_err = args.out / "load.txt", args.out / "load.err"
    shape = (args.load_task, args.load_size, args.load_size, args.load_batch)
    summary = summarize(
        json.loads(engine_json.read_text()),
        load_txt.read_text() if load_txt.is_file() else None,
        args.load_mode,
        shape,
        load_err.read_text() if load_err.is_file() else "",
    )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
