"""MPRNet image restoration: architecture, checkpoints, inference with tiling, training and evaluation."""

from .arch import MULTIPLE_OF, MPRNet
from .checkpoint import CheckpointError, load_mprnet, read_state_dict, save_release_format, save_safetensors, sha256_file
from .inference import Restorer, TileSettings, load_restorer, resolve_device, resolve_precision
from .tiling import TileAssembler, TilePlan, extract_tiles, pad_to, pad_to_multiple, plan_tiles
from .variants import PAPER_TASKS, TASKS, TINY, VARIANTS, config_from_state_dict

__all__ = [
    "MULTIPLE_OF", "MPRNet", "CheckpointError", "load_mprnet", "read_state_dict", "save_release_format",
    "save_safetensors", "sha256_file", "Restorer", "TileSettings", "load_restorer", "resolve_device",
    "resolve_precision", "TileAssembler", "TilePlan", "extract_tiles", "pad_to", "pad_to_multiple",
    "plan_tiles", "PAPER_TASKS", "TASKS", "TINY", "VARIANTS", "config_from_state_dict",
]
