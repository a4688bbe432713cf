"""Loading one model per task from the settings (configured weights, else the bundled defaults).

Loading happens before the server binds its port, so a missing or corrupt weights file stops
start-up with a message that names the setting, instead of a server that never becomes ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.bundled import bundled_weights
from model.checkpoint import CheckpointError, load_mprnet, sha256_file
from model.engine import EngineSettings
from model.engine_api import InferenceEngine, TileSettings, build_engine
from model.inference import resolve_device
from model.variants import PAPER_TASKS, config_from_state_dict

from .settings import Settings


class StartupError(RuntimeError):
    """A configuration problem found while loading; the message says which setting to fix."""


@dataclass
class TaskModel:
    """A task's warm model and where it came from (shown by GET /tasks)."""

    task: str
    engine: InferenceEngine  # the torch or OpenVINO engine in production, a fake in tests
    device: torch.device
    precision: str
    weights: str = "(in memory)"
    source: str = "custom"  # "bundled" or "configured"
    sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    parameters: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "paper_task": PAPER_TASKS.get(self.task, self.task),
            "weights": {"path": self.weights, "source": self.source, "sha256": self.sha256},
            "model": {"architecture": "MPRNet", "config": self.config, "parameters": self.parameters},
            "device": str(self.device),
            "precision": self.precision,
            "engine": self.engine.describe(),  # its name, modes and the memory of each warm shape
        }


def engine_for(settings: Settings, model: torch.nn.Module) -> InferenceEngine:
    """`model` on the engine the settings choose (MPRNET_ENGINE, device, precision, threads, tiles, caches)."""
    graphs = None if settings.cuda_graphs == "auto" else settings.cuda_graphs == "on"
    cache = str(settings.compile_cache_dir) if settings.compile_cache_dir else None
    torch_settings = EngineSettings(
        compile=settings.compile, cuda_graphs=graphs, cache_dir=cache, max_batch=settings.max_batch_size
    )
    tiles = TileSettings(settings.tile_size, settings.tile_overlap, settings.max_batch_size)
    return build_engine(
        model, settings.engine, device=settings.device, precision=settings.precision, tiles=tiles,
        threads=settings.model_threads(), cache_dir=cache, max_batch=settings.max_batch_size,
        torch_settings=torch_settings,
    )


def load_task(settings: Settings, task: str) -> TaskModel:
    setting = f"MPRNET_WEIGHTS_{task.upper()}"
    try:
        path = settings.weights_for(task)
        source = "configured"
        if path is None:
            path, source = bundled_weights(task), "bundled"
    except (CheckpointError, ValueError) as e:
        raise StartupError(f"{e}; set {setting} or MPRNET_WEIGHTS_DIR to a weights file") from None
    try:
        model = load_mprnet(path)
    except CheckpointError as e:
        raise StartupError(f"{setting if source == 'configured' else 'bundled weights'} ({path}): {e}") from None
    try:
        restorer = engine_for(settings, model)
    except ValueError as e:
        raise StartupError(
            f"MPRNET_ENGINE={settings.engine!r} / MPRNET_DEVICE={settings.device!r} / "
            f"MPRNET_PRECISION={settings.precision!r} / MPRNET_COMPILE={settings.compile!r} / "
            f"MPRNET_CUDA_GRAPHS={settings.cuda_graphs!r}: {e}"
        ) from None
    return TaskModel(
        task=task,
        engine=restorer,
        device=restorer.device,
        precision=restorer.precision,
        weights=str(Path(path).resolve()),
        source=source,
        sha256=sha256_file(path),
        config=config_from_state_dict(model.state_dict()),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def load_models(settings: Settings) -> dict[str, TaskModel]:
    """Every configured task's model, on the configured device; raises StartupError."""
    try:
        resolve_device(settings.device)
    except ValueError as e:
        raise StartupError(f"MPRNET_DEVICE={settings.device!r}: {e}") from None
    return {task: load_task(settings, task) for task in settings.tasks}
