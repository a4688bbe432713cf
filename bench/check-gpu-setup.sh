#!/usr/bin/env bash
# Rehearse bench/gpu.sh's set-up on the CPU, where pip reaches the package index: a clean CPython
# 3.12 venv holding only the GPU image's part of the run's dependency closure (torch 2.11.0 with its
# CUDA libraries, numpy, ... at the image's versions where bench/gpu-machine.txt knows them), then
# bench/gpu-setup.sh with the wheels of .whl/ (fetched first by bench/gpu-wheels.sh), which must
# install what is missing and import every module. Packages the image holds at an unknown version
# and .whl/ carries too (typing-extensions, ...) are left out of the venv: the install must supply them.
# Downloads torch 2.11 and its CUDA libraries (several GB) into a temporary folder.
#   bench/check-gpu-setup.sh [PYTHON3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${1:-}
for candidate in "$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python3.12 python3.12; do
  [ -n "$PY312" ] && break
  "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && PY312=$candidate
done
[ -n "$PY312" ] || { echo "check-gpu-setup: no python3.12 (pass one as the argument)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/check-gpu-setup.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
bench/gpu-wheels.sh >/dev/null
.venv/bin/python -m bench.gpu_wheels --image-part >"$WORK/image.txt"
echo "check-gpu-setup: the image's part: $(wc -l <"$WORK/image.txt") packages; .whl/: $(ls .whl/*.whl | wc -l) wheels"
"$PY312" -m venv "$WORK/venv"
# the image's part at exactly those versions, wheels only, nothing else
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$WORK/venv/bin/python" -m pip install -q --no-deps \
  --only-binary=:all: --index-url https://pypi.org/simple -r "$WORK/image.txt"
"$WORK/venv/bin/python" -m pip list --format=freeze >"$WORK/before.txt"
# bench/gpu.sh's set-up, as it runs on the machine (no index: .whl/ only)
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null bash bench/gpu-setup.sh "$WORK/venv/bin/python"
"$WORK/venv/bin/python" -m pip list --format=freeze >"$WORK/after.txt"
added=$(comm -13 <(sort "$WORK/before.txt") <(sort "$WORK/after.txt") | tr '\n' ' ')
echo "check-gpu-setup: installed by the set-up: $added"
