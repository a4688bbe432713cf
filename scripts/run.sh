#!/usr/bin/env bash
# Set up (first run only) and start the main job. Until the service lands this restores the bundled
# sample photo with the CLI; see README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
exec .venv/bin/mprnet restore --task denoise model/samples/ -o out/ "$@"
