"""The reference MPRNet of the `spandrel-extra-arches` package, loaded for tests and benchmarks only.

`import spandrel` imports every architecture it knows, one of which imports torchvision; the
torchvision wheel on PyPI does not load beside every torch build (e.g. a CPU build of torch). The
MPRNet file itself needs only torch and `spandrel.util`, so we load those two files directly,
behind a namespace stand-in for the `spandrel` package, without running `spandrel/__init__.py`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_mprnet_class() -> type:
    """Return spandrel's MPRNet class (raises ImportError if the dev dependency is missing)."""
    if "_reference_mprnet" in sys.modules:
        return sys.modules["_reference_mprnet"].MPRNet
    extra = importlib.util.find_spec("spandrel_extra_arches")
    base = importlib.util.find_spec("spandrel")
    if extra is None or base is None or extra.origin is None or base.origin is None:
        raise ImportError("the reference needs the dev dependencies spandrel and spandrel-extra-arches")
    base_dir = Path(base.origin).parent
    arch_file = Path(extra.origin).parent / "architectures" / "MPRNet" / "__arch" / "MPRNet.py"
    if "spandrel.util" not in sys.modules:
        if "spandrel" not in sys.modules:
            stand_in = types.ModuleType("spandrel")
            stand_in.__path__ = [str(base_dir)]  # a package, so `spandrel.util` resolves below it
            sys.modules["spandrel"] = stand_in
        _load_file("spandrel.util", base_dir / "util" / "__init__.py")
    return _load_file("_reference_mprnet", arch_file).MPRNet


def reference_mprnet(**hparams: Any):
    """Build the reference model with the given hyperparameters (release names)."""
    return reference_mprnet_class()(**hparams)
