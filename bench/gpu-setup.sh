#!/usr/bin/env bash
# bench/gpu.sh's set-up, on its own: install from .whl/ (bench/gpu-wheels.sh) what PYTHON's
# environment lacks or holds too old, from nothing else and keeping its torch; then import every
# module the run's stages use (bench/importcheck.py). Exit status 1 when a module does not import.
#   bench/gpu-setup.sh PYTHON        (WHEELS=folder: another folder than .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: bench/gpu-setup.sh PYTHON}
WHEELS=${WHEELS:-.whl}
if [ -f "$WHEELS/requirements.txt" ]; then
  count=$(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' | wc -l)
  echo "gpu-setup: installing from $WHEELS ($count wheels) what $PY's environment lacks"
  keep=$(mktemp)
  # the installed torch by its metadata: importing it can need what is still to be installed
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$keep" \
    || echo "gpu-setup: $PY has no torch"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check \
    -c "$keep" -r "$WHEELS/requirements.txt" || echo "gpu-setup: the wheel install failed (above)"
  rm -f "$keep"
fi
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA",
  torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -m bench.importcheck
