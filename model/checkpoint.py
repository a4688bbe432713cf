"""Loading and saving MPRNet weights: boring and safe.

Accepted inputs: the authors' release (``{"state_dict": ..., "epoch": ..., "optimizer": ...}``, keys
with or without ``module.``), a plain state dict, ``torch.compile`` wrappers (``_orig_mod.``), and
safetensors files. ``.pth`` files are read only with ``torch.load(weights_only=True)``; a file that
needs arbitrary unpickling is refused, never retried unsafely.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save

from .arch import MPRNet
from .variants import config_from_state_dict

_PREFIXES = ("module.", "_orig_mod.")
_SAFETENSORS_SUFFIXES = (".safetensors", ".st")


class CheckpointError(ValueError):
    """A weights file that cannot be used, with a message that says why."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` wrapper prefixes (any order, any count) from every key."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() in _SAFETENSORS_SUFFIXES:
        return True
    # safetensors starts with an 8-byte little-endian header length, then a JSON object
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat, prefix-free state dict of tensors (on the CPU)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"weights path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file is empty: {path}")
    if _is_safetensors(path):
        try:
            raw: Any = _st_load(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        raw = _torch_load(path)
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]  # the authors' training checkpoint format
    elif isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping) and "optimizer" in raw:
        raw = raw["model"]  # `mprnet train`'s last.pt / best.pt (model, optimizer, step, RNG states)
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{path} holds {type(raw).__name__}, not a state dict of tensors")
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a state dict: entries {bad[:3]} are not tensors")
    return strip_prefixes(raw)


def _looks_like_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive (PK\x03\x04); the legacy format and bare pickles start with
    # the pickle PROTO opcode (0x80) and a protocol number 2..5.
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _torch_load(path: Path) -> Any:
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, BadZipFile, KeyError...
        msg = str(e)
        first = msg.splitlines()[0] if msg else type(e).__name__
        if "Weights only load failed" in msg:
            # torch's own reason is the first line after its generic preamble that names the problem
            lines = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
            reason = next((ln for ln in lines if not ln.startswith(("Please file", "Check the documentation"))), first)
            if reason.startswith(("Unsupported operand", "String is too long")):  # garbage, not a refused object
                raise CheckpointError(f"{path} is truncated or corrupt: the pickle stream is malformed ({reason})") from None
            raise CheckpointError(
                f"{path} contains Python objects beyond tensors ({reason}); it was refused because loading it "
                "could run arbitrary code (only weights_only=True loading is allowed). Re-save it as a plain "
                "state dict or as safetensors."
            ) from None
        if isinstance(e, (EOFError, zipfile.BadZipFile)) or any(
            s in msg for s in ("PytorchStreamReader", "zip archive", "EOF", "corrupt")
        ):
            raise CheckpointError(f"{path} is truncated or corrupt: {first}") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None


def build_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> MPRNet:
    """Construct an MPRNet whose widths come from `sd`'s shapes and load `sd` strictly."""
    try:
        config = config_from_state_dict(sd)
    except KeyError as e:
        model_keys = set(MPRNet(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1).state_dict())
        missing = sorted(model_keys - set(sd))[:5]
        unexpected = sorted(set(sd) - model_keys)[:5]
        raise CheckpointError(
            f"{source} is not an MPRNet checkpoint (no {e.args[0]!r}); "
            f"missing keys include {missing}; unexpected keys include {unexpected}"
        ) from None
    except (IndexError, ZeroDivisionError) as e:  # a tensor with too few dimensions, a zero width...
        raise CheckpointError(f"{source}: tensor shapes do not describe an MPRNet ({type(e).__name__}: {e})") from None
    try:
        model = MPRNet(**config)
    except (ValueError, ZeroDivisionError) as e:  # e.g. a squeeze conv wider than its input: reduction 0
        raise CheckpointError(f"{source}: inconsistent MPRNet widths {config}: {e}") from None
    check_compatible(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def check_compatible(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing/unexpected keys and mismatched shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the MPRNet architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
        )
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if wrong:
        shown = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in wrong[:5])
        raise CheckpointError(f"{source} has {len(wrong)} tensors of the wrong shape: {shown}")


def load_mprnet(path: str | Path) -> MPRNet:
    """Load any MPRNet checkpoint (release, plain, compiled, safetensors) as an fp32 model in eval mode."""
    model = build_from_state_dict(read_state_dict(path), source=str(path))
    return model.float().eval()


def _cloned_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    # The shared PReLU appears under many keys with one storage; safetensors refuses shared
    # storage, so every tensor is cloned into its own contiguous buffer.
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.clone().contiguous()
    return sd


def save_safetensors(
    model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Save weights as safetensors (optionally cast, e.g. to fp16 for bundling)."""
    _st_save(_cloned_state_dict(model, dtype), str(path), metadata=metadata)


def save_release_format(model: torch.nn.Module, path: str | Path, epoch: int = 0) -> None:
    """Save in the authors' format: ``{"epoch": int, "state_dict": {...}}`` (loads with weights_only=True)."""
    torch.save({"epoch": int(epoch), "state_dict": _cloned_state_dict(model)}, path)
