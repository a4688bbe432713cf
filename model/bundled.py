"""The project's own bundled weights (trained by `mprnet train`, see model/weights/*.md)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError
from .variants import TASKS

WEIGHTS_DIR = Path(__file__).parent / "weights"


def bundled_weights(task: str) -> Path:
    """Path of the bundled fp16 safetensors file for `task` (deblur, derain or denoise)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    path = WEIGHTS_DIR / f"{task}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no bundled weights for {task} at {path}; pass a weights file explicitly")
    return path
