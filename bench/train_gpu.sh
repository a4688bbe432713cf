#!/usr/bin/env bash
# Deblur training on one GPU, in one call: `mprnet train --task deblur` at a width that ships
# (n_feat 48, scale_unetfeats 16, scale_orsnetfeats 8, num_cab 4: 3.2 M parameters, 6.5 MB in fp16;
# the paper's 96/48/32/8 would be 40 MB), bf16 autocast, the paper's loss, batch 16 of 192 px crops,
# an 8-minute wall-clock budget with the cosine decay following it, validation on the three held-out
# photos blurred with 8 seeded kernels each (--val-repeats 8). Checkpoints, the fp16 export and the
# log land in $OUT/deblur (what comes back from the GPU machine). Evaluate afterwards on the CPU:
#   mprnet evaluate --task deblur --weights out/deblur/best.safetensors
#
#   bash bench/train_gpu.sh --prepare   # here, with network: fill .train/ (photos, held-out photos, wheels)
#   bash bench/train_gpu.sh             # there, with .train carried: the run (about 9 minutes)
#   bash bench/train_gpu.sh --smoke     # CPU, tiny width, a few steps: the same command's plumbing
#   bash bench/train_gpu.sh --print     # print the training command and exit
#
# .train/ (git-ignored): photos/ (`mprnet photos --max-side 512`: scikit-image's, PyPI wheels' and the
# Debian packages' training photos, never the held-out ones), holdout/ (coffee, chelsea, rocket from
# scikit-image, for validation), whl/ (scipy and tqdm for CPython 3.12: the lent machines' image has
# torch, numpy and Pillow but not these). --prepare refuses to finish if .train/ and the tracked
# files together exceed 60 MiB (64 MiB can travel). Knobs: OUT, DATA (default .train), PYTHON,
# MINUTES (default 8: the whole call, set-up included, must fit one 10-minute device command),
# DEBS (a folder of already downloaded .deb files for `mprnet photos --debs`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
DATA=${DATA:-.train}
MODE=${1:-run}
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=.venv/bin/python
fi

train_cmd() {
  if [ "$MODE" = --smoke ]; then
    # The same command at a tiny width and size on the CPU (bf16 autocast works there too, slowly).
    set -- --device cpu --n-feat 8 --scale-unet 4 --scale-ors 4 --num-cab 1 --batch 2 --patch 32 --steps 3 \
      --val-every 2 --val-crop 48 --val-repeats 2 --max-minutes 5 --threads 1
  else
    set -- --device cuda --n-feat 48 --scale-unet 16 --scale-ors 8 --num-cab 4 --batch 16 --patch 192 --steps 1000000 \
      --val-every 250 --val-crop 256 --val-repeats 8 --max-minutes "${MINUTES:-8}"
  fi
  echo "$PY" -m model train --task deblur --out "$OUT/deblur" --clean "$DATA/photos" --val-clean "$DATA/holdout" \
    --precision bf16 --lr 3e-4 --warmup 200 --clip 1.0 --seed 1 --quiet "$@"
}

case "$MODE" in
  --print) train_cmd; exit 0 ;;
  --prepare)
    grep -qxF '/.train/' .gitignore || { echo "bench/train_gpu.sh: /.train/ must be in .gitignore" >&2; exit 1; }
    mkdir -p "$DATA/whl" "$DATA/holdout"
    "$PY" -m model photos "$DATA/photos" --max-side 512 ${DEBS:+--debs "$DEBS"} >/dev/null
    "$PY" - "$DATA/holdout" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from model.training.data import HOLDOUT_PHOTOS, skimage_photo_dir
for name in HOLDOUT_PHOTOS:
    Image.open(skimage_photo_dir() / name).convert("RGB").save(Path(sys.argv[1]) / (Path(name).stem + ".png"))
EOF
    specs=""
    for p in scipy tqdm; do specs="$specs $p==$("$PY" -m pip show "$p" | awk '/^Version:/{print $2}')"; done
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DATA/whl" $specs
    total=$(( $(du -sb "$DATA" | cut -f1) + $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) ))
    echo "$DATA: $(ls "$DATA/photos" | grep -c png) photos; with the tracked files $((total / 1048576)) MiB"
    [ "$total" -le $((60 * 1048576)) ] || { echo "bench/train_gpu.sh: over 60 MiB, lower --max-side" >&2; exit 1; }
    exit 0 ;;
  run | --smoke) ;;
  *) echo "usage: bash bench/train_gpu.sh [--prepare|--smoke|--print]" >&2; exit 2 ;;
esac

for d in "$DATA/photos" "$DATA/holdout"; do
  [ -d "$d" ] || { echo "bench/train_gpu.sh: no $d (run bash bench/train_gpu.sh --prepare first)" >&2; exit 1; }
done
if compgen -G "$DATA/whl/*.whl" >/dev/null && ! "$PY" -c 'import scipy, tqdm' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/train-site "$DATA"/whl/*.whl
  export PYTHONPATH=/tmp/train-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/deblur"
if [ "$MODE" = run ]; then
  "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || { echo "bench/train_gpu.sh: no CUDA device" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv >"$OUT/deblur/gpu.txt" 2>&1 || true
fi
cmd=$(train_cmd)
echo "$cmd" >"$OUT/deblur/command.txt"
start=$(date +%s)
$cmd 2>&1 | tee "$OUT/deblur/train.txt"
echo "training took $(( $(date +%s) - start )) s" | tee -a "$OUT/deblur/train.txt"
