#!/usr/bin/env bash
# Set up (first run only) and start the restoration service on the bundled default weights, on the
# GPU when there is one, else the CPU. Every MPRNET_* setting in the environment applies (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export MPRNET_HOST="${MPRNET_HOST:-127.0.0.1}"
export MPRNET_PORT="${MPRNET_PORT:-8000}"
export MPRNET_DEVICE="${MPRNET_DEVICE:-auto}"
# exported and compiled models kept across restarts (the OpenVINO engine's graph and shapes)
export MPRNET_COMPILE_CACHE_DIR="${MPRNET_COMPILE_CACHE_DIR:-$PWD/.cache/compile}"
echo "mprnet-serve: http://${MPRNET_HOST}:${MPRNET_PORT}/ (device ${MPRNET_DEVICE}; Ctrl+C drains and stops)" >&2
exec .venv/bin/mprnet-serve
