#!/usr/bin/env bash
# Fetch, here (where pip reaches PyPI), the wheels bench/gpu.sh needs on a GPU machine that reaches
# nothing: the lent machines' image has python3 3.12 with torch, numpy, Pillow, safetensors, httpx,
# prometheus-client, anyio, h11, click and annotated-doc, but not the service's web stack nor the
# reference implementation. Versions are those of this checkout's .venv (pure Python, except
# pydantic-core, fetched for CPython 3.12 on x86-64 Linux).
#
#   bench/gpu-wheels.sh            # -> .whl/ (git-ignored through .git/info/exclude)
#   then run bench/gpu.sh there with `.whl` carried beside the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEST=.whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$DEST"
PACKAGES="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types uvicorn python-multipart spandrel spandrel-extra-arches"
specs=""
for p in $PACKAGES; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$v" ] || { echo "gpu-wheels: $p is not installed in .venv (run scripts/setup.sh dev)" >&2; exit 1; }
  specs="$specs $p==$v"
done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $specs
ls "$DEST"
du -sh "$DEST"
