#!/usr/bin/env bash
# The prepared first-CUDA-run check (benchmarks/gpu_check.py): one table, <= 8 minutes on one
# H100/H200-class GPU. `bash benchmarks/gpu_check.sh --dry-run` runs it on the CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
