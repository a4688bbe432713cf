#!/usr/bin/env bash
# Create .venv (if missing) and install the project. Usage: scripts/setup.sh [extra]   e.g. "dev"
# Idempotent: re-running only installs what changed. The OpenVINO engine (the fast CPU runtime, about
# 180 MB) comes with it; MPRNET_SETUP_OPENVINO=0 leaves it out (a GPU-only host does not use it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# torch first, exactly pinned: on the project's machines this is the CPU build on local disk. On a
# GPU host, install the CUDA build of the same version before running this (see README).
.venv/bin/pip install -q "torch==2.13.0"
extras="$extra"
if [ "${MPRNET_SETUP_OPENVINO:-1}" != 0 ]; then extras="${extras:+$extras,}openvino"; fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/pip install -q -e "$spec"
