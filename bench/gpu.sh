#!/usr/bin/env bash
# The GPU run, one command, at most 8 minutes on one H100/H200:
#   1. set-up: what the image lacks (the web stack, the reference implementation) from .whl/ (no
#      network there), then an import of every module the stages use (bench/importcheck.py)
#   2. engine vs reference (bench/engine.py), the paper's configurations with seeded random weights
#      (BUNDLED_WEIGHTS=1: the small bundled models): deblur 256x256 best batch and batch 1, deblur 1280x720
#      batch 1, derain 256x256 best batch; compile/graph outputs against eager; bf16 vs fp32 PSNR
#      on a real photo for each task
#   3. HTTP load (bench/load.py) against a server on this machine, deblur 256x256, at saturation; then
#      once more at C=128 with MPRNET_BATCHES_AHEAD=0 (load-ahead0.txt): what handing batches ahead gains
#   4. summary (bench/gpu_report.py): the targets' table, targets met or not
# Everything lands in $OUT (default ./out): gpu.log, engine.json, engine.md, load.txt, load-ahead0.txt, load.err,
# summary.json, summary.md. Each stage has its own `timeout`, so one that hangs or runs long
# costs its slice and the others still run.
#
# On this project's lent GPU machines (python3 3.12 with a CUDA torch, nothing reachable): first,
# where pip works, `bench/gpu-wheels.sh` (fills .whl/), then run `bash bench/gpu.sh` there with `.whl`
# carried. Elsewhere: any python with a CUDA torch and `pip install -e .[dev]` done.
#
#   bash bench/gpu.sh            # the full run
#   bash bench/gpu.sh --smoke    # CPU, tiny config, seconds: the stages' plumbing (the tests run this)
# Knobs: OUT, PYTHON (default python3, or .venv/bin/python when there is one and no CUDA python3),
# ENGINE_BUDGET_S (no compile starts after it; default 210), TOTAL_S (the stages' deadline; default 450), LOAD_COMPILE (off|default: the
# server's MPRNET_COMPILE; default off, graphs only, so the server warms up in seconds), GPU_TESTS=1
# (first run the engine's tests marked gpu; leave ENGINE_BUDGET_S lower to stay inside 8 minutes),
# BUNDLED_WEIGHTS=1 (time the small bundled models instead of the paper configurations).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-./out}
mkdir -p "$OUT"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=.venv/bin/python
fi
LOAD_COMPILE=${LOAD_COMPILE:-off}
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_S:-450}))  # the whole run ends inside 8 minutes, whatever each stage does
# limit N: N seconds, or what is left before DEADLINE if that is less (at least 5)
limit() { local left=$((DEADLINE - $(date +%s))); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }
log() { echo "[gpu.sh +$(($(date +%s) - START))s] $*" | tee -a "$OUT/gpu.log"; }
: > "$OUT/gpu.log"

# ---- 1. set-up (at most 150 s) ----------------------------------------------------------------
# bench/gpu-setup.sh: pip installs from .whl/ (bench/gpu-wheels.sh), and from nothing else, only what
# the image's own packages do not satisfy, keeping the image's torch; then every module the stages
# use is imported (finding them is not enough: an import can still fail). In smoke mode: the import only.
INCOMPLETE="set-up incomplete: see above (the stages that need what is missing will fail)"
if [ $SMOKE = 1 ]; then
  PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} timeout "$(limit 90)" "$PY" -m bench.importcheck 2>&1 | tee -a "$OUT/gpu.log" \
    || log "$INCOMPLETE"
else
  timeout "$(limit 150)" bash bench/gpu-setup.sh "$PY" 2>&1 | tee -a "$OUT/gpu.log" || log "$INCOMPLETE"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if [ $SMOKE = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  log "no CUDA device for $PY: this run needs a GPU (bash bench/gpu.sh --smoke runs the stages on the CPU)"
  exit 2
fi
if [ $SMOKE = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv >>"$OUT/gpu.log" 2>&1
fi

# ---- 1b. optional: the engine's GPU tests (GPU_TESTS=1; about a minute of tiny compiles) ----------
if [ $SMOKE = 0 ] && [ "${GPU_TESTS:-0}" = 1 ]; then
  log "gpu tests: pytest -m gpu tests/model/test_engine.py"
  timeout "$(limit 120)" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/model/test_engine.py >>"$OUT/gpu.log" 2>&1
  log "gpu tests: rc $?"
fi

# ---- 2. engine vs reference (at most 300 s; no compile starts after ENGINE_BUDGET_S) ------------
if [ $SMOKE = 1 ]; then
  log "engine: smoke run on the CPU"
  timeout 120 "$PY" -m bench.engine --smoke --out "$OUT" >>"$OUT/gpu.log" 2>&1 || log "engine stage failed or timed out (rc $?)"
else
  log "engine: rows, checks (budget ${ENGINE_BUDGET_S:-210} s for starting compiles)"
  # SIGINT, not TERM: Python unwinds (finally blocks run); rows are saved as they are measured
  BUNDLED=()
  [ "${BUNDLED_WEIGHTS:-0}" = 1 ] && BUNDLED=(--bundled-weights)
  timeout -s INT -k 15 "$(limit 300)" "$PY" -m bench.engine --out "$OUT" --budget-s "${ENGINE_BUDGET_S:-210}" "${BUNDLED[@]}" \
    >>"$OUT/gpu.log" 2>&1
  rc=$?
  [ $rc = 0 ] || log "engine stage failed or timed out (rc $rc); rows measured so far are in engine.json"
fi

# ---- 3. HTTP load against a server on this machine (at most 120 s) ------------------------------
if [ $SMOKE = 1 ]; then
  log "load: skipped in smoke mode"
else
  # the paper's deblur configuration with seeded random weights, as the engine stage times it
  # (throughput does not depend on the values); BUNDLED_WEIGHTS=1: the small bundled model
  WEIGHTS=$ROOT/model/weights
  if [ "${BUNDLED_WEIGHTS:-0}" != 1 ]; then
    WEIGHTS=/tmp/mprnet-weights
    timeout "$(limit 60)" "$PY" -c "
import os, torch; from model.arch import MPRNet; from model.variants import VARIANTS; from model.checkpoint import save_safetensors
os.makedirs('$WEIGHTS', exist_ok=True); torch.manual_seed(0)
save_safetensors(MPRNet(**VARIANTS['deblur']), '$WEIGHTS/deblur.safetensors')
" >>"$OUT/gpu.log" 2>&1 || log "could not write random weights"
  fi
  log "load: deblur 256x256, server MPRNET_COMPILE=$LOAD_COMPILE with CUDA graphs, batches up to 32"
  # One bucket and tiles of the same size: the server has one item shape (256x256) to warm up.
  MPRNET_TASKS=deblur MPRNET_BUCKETS=256 MPRNET_TILE_SIZE=256 MPRNET_TILE_OVERLAP=32 MPRNET_MAX_BATCH_SIZE=32 \
  MPRNET_BATCH_MEGAPIXELS=2.2 MPRNET_QUEUE_MAX_REQUESTS=1024 MPRNET_COMPILE=$LOAD_COMPILE MPRNET_CUDA_GRAPHS=on \
  MPRNET_COMPILE_CACHE_DIR=/tmp/mprnet-compile-cache \
    timeout -s INT -k 15 "$(limit 120)" "$PY" -m bench.load --spawn --weights "$WEIGHTS" --task deblur --sizes 256x256 \
      --concurrency 32,64,128 --duration 12 >"$OUT/load.txt" 2>"$OUT/load.err" || log "load stage failed or timed out (rc $?); see load.err"
  # The same at the highest concurrency with every batch formed only when the device is idle (no batch
  # handed over, and uploaded, while another computes): what MPRNET_BATCHES_AHEAD=1 above gains.
  log "load: the same, C=128, MPRNET_BATCHES_AHEAD=0"
  MPRNET_TASKS=deblur MPRNET_BUCKETS=256 MPRNET_TILE_SIZE=256 MPRNET_TILE_OVERLAP=32 MPRNET_MAX_BATCH_SIZE=32 \
  MPRNET_BATCH_MEGAPIXELS=2.2 MPRNET_QUEUE_MAX_REQUESTS=1024 MPRNET_COMPILE=$LOAD_COMPILE MPRNET_CUDA_GRAPHS=on \
  MPRNET_COMPILE_CACHE_DIR=/tmp/mprnet-compile-cache MPRNET_BATCHES_AHEAD=0 \
    timeout -s INT -k 15 "$(limit 45)" "$PY" -m bench.load --spawn --weights "$WEIGHTS" --task deblur --sizes 256x256 \
      --concurrency 128 --duration 12 >"$OUT/load-ahead0.txt" 2>>"$OUT/load.err" || log "load (ahead 0) failed (rc $?)"
fi

# ---- 4. summary -------------------------------------------------------------------------------
MODE=graphs
[ "$LOAD_COMPILE" = default ] && MODE=compile+graphs
TOTAL_LEFT=$((DEADLINE + 15 - $(date +%s)))
timeout $((TOTAL_LEFT > 5 ? TOTAL_LEFT : 5)) "$PY" -m bench.gpu_report --out "$OUT" --load-mode "$MODE" --load-batch 32 2>&1 | tee -a "$OUT/gpu.log"
[ -f "$OUT/engine.md" ] && cat "$OUT/engine.md"
log "done in $(($(date +%s) - START)) s; files in $OUT"
