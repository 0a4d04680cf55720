#!/usr/bin/env bash
# The one-GPU benchmark set recorded in docs/benchmarks.md: ViT-B stage-1 (2D) and stage-2 (3D) train steps in
# bf16 with cuDNN's fused attention (the recipe configs' compute_dtype and attention_impl=auto on a GPU).
#   bash bench/run_gpu.sh OUT_DIR        (PYTHON=... to pick the interpreter)
# One JSON per row in OUT_DIR, each row its own process so the allocator's measured peak is that row's alone.
# Rows, most important first, so a run cut short still leaves results: patch 16 as configured; patch 8 with full
# rematerialisation (the planner puts it over 80 GB otherwise at these batches); patch 16 with XLA's attention
# (fused vs. unfused), in float32 (bf16 vs. f32), with the blocks unrolled (compile time of the scan vs. the
# loop) and with remat (memory). A tiny bf16 step runs first and stops the script if the stack is broken.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || -z "${1:-}" ]]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
OUT_DIR="$1"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}" PYTHONUNBUFFERED=1
row() {  # row NAME VARIANT PATCH [--set K=V ...]
  local name="$1" variant="$2" patch="$3"
  shift 3
  echo "== $name ($(date -u +%H:%M:%S))"
  "$PYTHON" bench/bench_train_step.py --variants "$variant" --patch-sizes "$patch" --steps 5 "$@" \
    --out "$OUT_DIR/train_step_gpu_$name.json" >/dev/null || echo "== $name: exit status $?"
}
"$PYTHON" bench/bench_train_step.py --variants s1-tiny --patch-sizes 16 --steps 2 --set model.compute_dtype=bfloat16 \
  --out "$OUT_DIR/train_step_gpu_tiny_check.json" >/dev/null
row s1_p16 s1-base-gpu 16
row s2_p16 s2-base-gpu 16
row s1_p8_remat s1-base-gpu 8 --set model.remat_policy=full
row s2_p8_remat s2-base-gpu 8 --set model.remat_policy=full
row s1_p16_xla_attention s1-base-gpu 16 --set model.attention_impl=xla
row s1_p16_float32 s1-base-gpu 16 --set model.compute_dtype=float32
row s1_p16_unrolled s1-base-gpu 16 --set model.scan_blocks=false
row s1_p16_remat s1-base-gpu 16 --set model.remat_policy=full
