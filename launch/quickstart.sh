#!/usr/bin/env bash
# The README quickstart's main job on the embedded default (synthetic CT phantoms, no download, CPU):
#   phantoms → ingest (LPS, int16 zarr3) → stage 1: axial slices + 2D SSL (demo ViT)
#            → stage 2: 2 mm volumes + 3D SSL, starting from the stage-1 EMA teacher inflated to 3D.
#
#   bash launch/quickstart.sh [RUN_DIR] [extra --config.KEY=VALUE flags for the stage-1 trainer]
#
# Re-running resumes: finished data steps are skipped and each stage continues from its last checkpoint.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
RUN_DIR="${1:-runs/quickstart}"
shift || true
PYTHON="${PYTHON:-python}"

echo "== 1/6 synthetic CT phantoms → $RUN_DIR/phantoms"
if [[ ! -f "$RUN_DIR/phantoms/labels.json" ]]; then
  "$PYTHON" -m data_prep.synthetic --output "$RUN_DIR/phantoms" --count 8 --seed 0
fi
echo "== 2/6 ingest at 1.5 mm → $RUN_DIR/dataset_1.5mm, axial slices → $RUN_DIR/slices"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset_1.5mm" --spacing 1.5,1.5,1.5
if [[ ! -f "$RUN_DIR/slices/index.json" ]]; then
  "$PYTHON" -m data_prep.slices --dataset "$RUN_DIR/dataset_1.5mm" --output "$RUN_DIR/slices" --size 128 --fov-mm 342
fi
echo "== 3/6 stage 1: 2D SSL (configs/stage1.py:demo) → $RUN_DIR/stage1"
"$PYTHON" -m flexict_jax.train --config=configs/stage1.py:demo --workdir="$RUN_DIR/stage1" \
  --config.data.dir="$RUN_DIR/slices" "$@"
echo "== 4/6 ingest at 2 mm for the 3D stages → $RUN_DIR/dataset_2mm (+ per-volume HU statistics)"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset_2mm" --spacing 2,2,2
"$PYTHON" -m data_prep.volume_stats --dataset "$RUN_DIR/dataset_2mm"
echo "== 5/6 stage 2: 3D SSL from the inflated stage-1 teacher (configs/stage2.py:demo) → $RUN_DIR/stage2"
"$PYTHON" -m flexict_jax.train --config=configs/stage2.py:demo --workdir="$RUN_DIR/stage2" \
  --config.data.dir="$RUN_DIR/dataset_2mm" --config.init.from="$RUN_DIR/stage1"
echo "== 6/6 done: metrics in $RUN_DIR/stage{1,2}/metrics.jsonl, checkpoints in $RUN_DIR/stage{1,2}/checkpoints"
