"""Our MPRNet as a portable graph: ONNX (for ONNX Runtime, OpenVINO, Triton) or OpenVINO IR, with a model card.

The exported graph is the restoration alone: (B, 3, H, W) float32 RGB in [0, 1] -> the last stage's
output clamped to [0, 1], same shape. Batch, height and width are dynamic; H and W must be multiples
of 8 (pad first: reflect, then replicate where the image is too small to reflect). The CPU engines
(model/engine_openvino.py) run this same graph, so what a user exports is what the service serves.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arch import MULTIPLE_OF
from .variants import config_from_state_dict

OPSET = 17
FORMATS = ("onnx", "openvino")
INPUT, OUTPUT = "image", "restored"
_CACHE_VERSION = "1"  # bump when the exported graph changes for the same weights


class Restoration(nn.Module):
    """MPRNet's serving contract as a module: element 0 of the output, clamped to [0, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 3, H, W)
        return self.model(x)[0].clamp(0, 1)


def weights_key(model: nn.Module) -> str:
    """A digest of the weights and the export settings: the name of a cached export."""
    h = hashlib.sha256(f"{_CACHE_VERSION}/{OPSET}/{torch.__version__}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def onnx_bytes(model: nn.Module) -> bytes:
    """The restoration as an ONNX graph (float32, dynamic batch, height and width)."""
    net = Restoration(copy.deepcopy(model).float().cpu().eval())
    example = torch.rand(1, 3, 4 * MULTIPLE_OF, 4 * MULTIPLE_OF, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the tracer warns about the Python-side shape check in MPRNet.forward: it is a check, not a branch
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buf, dynamo=False, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: axes, OUTPUT: axes},
        )
    return buf.getvalue()


def cached_onnx(model: nn.Module, cache_dir: str | os.PathLike[str] | None) -> bytes:
    """`onnx_bytes(model)`, kept under `cache_dir`/onnx when given, so a restart skips the export."""
    if cache_dir is None:
        return onnx_bytes(model)
    path = Path(cache_dir) / "onnx" / f"mprnet-{weights_key(model)}.onnx"
    if path.is_file():
        return path.read_bytes()
    data = onnx_bytes(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return data


def model_card(model: nn.Module, task: str, weights: str, licence: str, fmt: str, files: list[str]) -> dict[str, Any]:
    return {
        "architecture": "MPRNet (this project's implementation)",
        "task": task,
        "files": files,
        "format": fmt,
        "onnx_opset": OPSET,
        "input": {"name": INPUT, "shape": ["batch", 3, "height", "width"], "dtype": "float32", "range": [0.0, 1.0],
                  "colour": "RGB"},
        "output": {"name": OUTPUT, "shape": ["batch", 3, "height", "width"], "dtype": "float32", "range": [0.0, 1.0]},
        "padding": f"height and width must be multiples of {MULTIPLE_OF}: pad the bottom and right edges by reflection "
                   "(replicate where the image is too small to reflect), run, crop the padding away",
        "config": config_from_state_dict(model.state_dict()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": weights,
        "weights_licence": licence,
        "exported_with": {"torch": torch.__version__},
    }


def export(
    model: nn.Module, fmt: str, out_dir: str | os.PathLike[str], *, task: str, weights: str, licence: str
) -> list[Path]:
    """Write the restoration as `fmt` (onnx: one .onnx file; openvino: .xml + .bin) and a model card into
    `out_dir`; the paths written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"mprnet-{task}"
    data = onnx_bytes(model)
    versions = {}
    if fmt == "onnx":
        written = [out / f"{stem}.onnx"]
        written[0].write_bytes(data)
    else:
        import openvino as ov

        xml = out / f"{stem}.xml"
        ov.save_model(ov.Core().read_model(data, b""), xml, compress_to_fp16=False)  # fp32 weights, as exported
        written = [xml, xml.with_suffix(".bin")]
        versions["openvino"] = ov.__version__
    card = model_card(model, task, weights, licence, fmt, [p.name for p in written])
    card["exported_with"].update(versions)
    card_path = out / f"{stem}.model-card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return [*written, card_path]
