#!/usr/bin/env bash
# The README quickstart's main job on the embedded default: synthetic CT phantoms → ingest (LPS, 1.5 mm,
# zarr3) → axial slice shards → stage-1 training of the `demo` ViT on CPU, with checkpoints.
#
#   bash launch/quickstart.sh [RUN_DIR] [extra --config.KEY=VALUE flags for the trainer]
#
# Re-running resumes: finished data steps are skipped and training continues from its last checkpoint.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
RUN_DIR="${1:-runs/quickstart}"
shift || true
PYTHON="${PYTHON:-python}"

echo "== 1/4 synthetic CT phantoms → $RUN_DIR/phantoms"
if [[ ! -f "$RUN_DIR/phantoms/labels.json" ]]; then
  "$PYTHON" -m data_prep.synthetic --output "$RUN_DIR/phantoms" --count 8 --seed 0
fi
echo "== 2/4 ingest → $RUN_DIR/dataset"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset" --spacing 1.5,1.5,1.5
echo "== 3/4 axial slices → $RUN_DIR/slices"
if [[ ! -f "$RUN_DIR/slices/index.json" ]]; then
  "$PYTHON" -m data_prep.slices --dataset "$RUN_DIR/dataset" --output "$RUN_DIR/slices" --size 128 --fov-mm 342
fi
echo "== 4/4 stage-1 training (configs/stage1.py:demo) → $RUN_DIR/stage1"
"$PYTHON" -m flexict_jax.train --config=configs/stage1.py:demo --workdir="$RUN_DIR/stage1" \
  --config.data.dir="$RUN_DIR/slices" "$@"
echo "done: metrics in $RUN_DIR/stage1/metrics.jsonl, checkpoints in $RUN_DIR/stage1/checkpoints"
