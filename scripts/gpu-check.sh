#!/usr/bin/env bash
# GPU checks and a short GPU benchmark for sazd, on a machine with an NVIDIA GPU and a CUDA build of
# PyTorch. Without CUDA it stops at once with a one-line message and exit status 2.
#
#   scripts/gpu-check.sh            # uses `python` (set PYTHON=/path/to/python to choose)
#
# Checks (each prints PASS/FAIL with the measured error): worker products on the GPU against float64
# on the CPU; bfloat16/float16 worker products decoded in float32; DEU updates on the GPU against the
# CPU; a short in-process coded training run with GPU workers against plain PyTorch; with Ray and
# enough GPUs, a short `--gpus-per-worker` run (where each worker ran). Then figures: block products
# in float32/bfloat16/float16 and one DEU iteration, GPU workers vs CPU workers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu-check: $PY cannot import PyTorch; set PYTHON to the interpreter of sazd's environment" >&2
    exit 2
fi
exec env PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/gpu_check.py "$@"
