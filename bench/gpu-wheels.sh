#!/usr/bin/env bash
# Fetch, here (where pip reaches the package index), the wheels bench/gpu.sh needs on a lent GPU
# machine that reaches nothing: the dependency closure of the run (the service, the load benchmark's
# client, the reference implementation) for CPython 3.12 on manylinux x86-64, less what that
# machine's image holds (bench/gpu-machine.txt). bench/gpu_wheels.py says how it is computed.
#
#   bench/gpu-wheels.sh            # -> .whl/ (git-ignored): the wheels, requirements.txt, fetched.txt
#   bench/gpu-wheels.sh --list     # what it would fetch, and why
#   then run bench/gpu.sh there with `.whl` carried beside the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench.gpu_wheels "$@"
