#!/usr/bin/env bash
# The one-GPU benchmark set recorded in docs/benchmarks.md: ViT-B stage-1 (2D) and stage-2 (3D) train steps.
#   bash bench/run_gpu.sh OUT_DIR        (PYTHON=... to pick the interpreter)
# Rows, most important first, so a run cut short still leaves results: patch 16 as configured; patch 8 with
# full rematerialisation (it does not fit 80 GB otherwise at these batches, `python -m flexict_jax.plan`);
# patch 16 with the blocks unrolled (compile time of the scan vs. the loop); patch 16 with remat (memory).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || -z "${1:-}" ]]; then
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
OUT_DIR="$1"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
bench() { "$PYTHON" bench/bench_train_step.py --variants s1-base-gpu,s2-base-gpu "$@"; }
bench --patch-sizes 16 --steps 5 --out "$OUT_DIR/train_step_gpu_p16.json"
bench --patch-sizes 8 --steps 5 --set model.remat_policy=full --out "$OUT_DIR/train_step_gpu_p8_remat.json"
"$PYTHON" bench/bench_train_step.py --variants s1-base-gpu --patch-sizes 16 --steps 3 --set model.scan_blocks=false \
  --out "$OUT_DIR/train_step_gpu_p16_unrolled.json"
"$PYTHON" bench/bench_train_step.py --variants s1-base-gpu --patch-sizes 16 --steps 3 --set model.remat_policy=full \
  --out "$OUT_DIR/train_step_gpu_p16_remat.json"
