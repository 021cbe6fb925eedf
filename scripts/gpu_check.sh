#!/usr/bin/env bash
# The one prepared GPU check (issue 15 item 7): CUDA tests, then batch-1 decode against the HBM bound.
# Sized for a short lease (about 6-8 minutes on an H100/H200 after setup); run from the repository root:
#     bash scripts/gpu_check.sh            # writes $OUT/gpu_tests.log and $OUT/gpu_decode.{json,log} when $OUT is set
# Setup is the README's: scripts/setup.sh makes .venv (the CUDA machine takes torch's default CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/_work/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The tests that use CUDA where it exists (each skips on a machine without it).
timeout 240 "$PY" -m pytest -q -rs tests/test_compiled.py tests/test_devices.py tests/test_api.py -k "cuda or compiled or device" \
    2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
# 8B shape, bf16: eager modules, torch.compile + CUDA graphs, and int8 weights compiled.
timeout 420 "$PY" benchmarks/gpu_decode.py --shape 8b --json "$OUT/gpu_decode.json" 2>&1 | tail -20 | tee "$OUT/gpu_decode.log"
