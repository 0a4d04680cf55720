#!/usr/bin/env bash
# The README quickstart's main job on the embedded default (synthetic CT phantoms, no download, CPU):
#   phantoms → ingest (LPS, int16 zarr3) → stage 1: axial slices + 2D SSL (demo ViT)
#            → stage 2: 2 mm volumes + 3D SSL, starting from the stage-1 EMA teacher inflated to 3D
#            → stage 3: 4 mm volumes + pseudo-reports from the label maps + a sentencepiece tokenizer,
#              report-guided alignment (CLIP + OSL) continuing the stage-2 teacher, image→report Recall@K
#            → pictures: feature PCA / similarity maps (stages 1, 2), curves, retrieval examples (stage 3)
#            → organ probe of the stage-1 teacher on the phantoms' label maps, beside 3 random inits of its model.
#
#   bash launch/quickstart.sh [RUN_DIR] [extra --config.KEY=VALUE flags for the stage-1 trainer]
#
# Re-running resumes: finished data steps are skipped and each stage continues from its last checkpoint.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
RUN_DIR="${1:-runs/quickstart}"
shift || true
PYTHON="${PYTHON:-python}"

echo "== 1/9 synthetic CT phantoms → $RUN_DIR/phantoms"
if [[ ! -f "$RUN_DIR/phantoms/labels.json" ]]; then
  "$PYTHON" -m data_prep.synthetic --output "$RUN_DIR/phantoms" --count 8 --seed 0
fi
echo "== 2/9 ingest at 1.5 mm → $RUN_DIR/dataset_1.5mm, axial slices → $RUN_DIR/slices"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset_1.5mm" --spacing 1.5,1.5,1.5
if [[ ! -f "$RUN_DIR/slices/index.json" ]]; then
  "$PYTHON" -m data_prep.slices --dataset "$RUN_DIR/dataset_1.5mm" --output "$RUN_DIR/slices" --size 128 --fov-mm 342
fi
echo "== 3/9 stage 1: 2D SSL (configs/stage1.py:demo) → $RUN_DIR/stage1"
"$PYTHON" -m flexict_jax.train --config=configs/stage1.py:demo --workdir="$RUN_DIR/stage1" \
  --config.data.dir="$RUN_DIR/slices" "$@"
echo "== 4/9 ingest at 2 mm for the 3D stages → $RUN_DIR/dataset_2mm (+ per-volume HU statistics)"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset_2mm" --spacing 2,2,2
"$PYTHON" -m data_prep.volume_stats --dataset "$RUN_DIR/dataset_2mm"
echo "== 5/9 stage 2: 3D SSL from the inflated stage-1 teacher (configs/stage2.py:demo) → $RUN_DIR/stage2"
"$PYTHON" -m flexict_jax.train --config=configs/stage2.py:demo --workdir="$RUN_DIR/stage2" \
  --config.data.dir="$RUN_DIR/dataset_2mm" --config.init.from="$RUN_DIR/stage1"
# Stage 3 sees one centred global crop (docs/recipe.md §8: 160³ at 2 mm, 320 mm). The demo's 48³ crop spans 192 mm at
# 4 mm, most of a phantom's trunk with the organs and lesions its pseudo-report describes; at 2 mm only 96 mm.
echo "== 6/9 ingest at 4 mm as the stage-3 training split → $RUN_DIR/dataset_4mm, pseudo-reports → $RUN_DIR/reports"
"$PYTHON" -m data_prep.ingest --input "$RUN_DIR/phantoms" --output "$RUN_DIR/dataset_4mm" --spacing 4,4,4 \
  --split train
"$PYTHON" -m data_prep.volume_stats --dataset "$RUN_DIR/dataset_4mm"
if [[ ! -f "$RUN_DIR/reports/index.json" ]]; then
  "$PYTHON" -m data_prep.reports --dataset "$RUN_DIR/dataset_4mm" --output "$RUN_DIR/reports"
fi
if [[ ! -f "$RUN_DIR/reports/tokenizer.model" ]]; then  # for the from-scratch text tower of the demo config
  "$PYTHON" -m data_prep.tokenizer --corpus "$RUN_DIR/reports" --vocab-size 300
fi
echo "== 7/9 stage 3: report-guided alignment from the stage-2 teacher (configs/stage3.py:demo) → $RUN_DIR/stage3"
"$PYTHON" -m flexict_jax.train --config=configs/stage3.py:demo --workdir="$RUN_DIR/stage3" \
  --config.data.dir="$RUN_DIR/reports" --config.init.from="$RUN_DIR/stage2"
# Pictures: PCA / similarity maps of the stage-1 (2D) and stage-2 (3D) teachers on a phantom, the runs' curves,
# and stage 3's retrieval examples with its Recall@K (flexict_jax.visualize, flexict_jax.evaluate).
echo "== 8/9 pictures → $RUN_DIR/pictures"
"$PYTHON" -m flexict_jax.visualize features --checkpoint="$RUN_DIR/stage1" --kind=2d \
  --input="$RUN_DIR/phantoms/phantom_000.nii.gz" --out="$RUN_DIR/pictures/stage1" --patch-size=8
"$PYTHON" -m flexict_jax.visualize features --checkpoint="$RUN_DIR/stage2" --kind=3d \
  --input="$RUN_DIR/phantoms/phantom_000.nii.gz" --out="$RUN_DIR/pictures/stage2" --patch-size=16
for stage in stage1 stage2 stage3; do
  "$PYTHON" -m flexict_jax.visualize curves --workdir="$RUN_DIR/$stage" --out="$RUN_DIR/pictures/$stage"
done
"$PYTHON" -m flexict_jax.evaluate --checkpoint="$RUN_DIR/stage3" --task=retrieval --reports="$RUN_DIR/reports" \
  --out="$RUN_DIR/pictures/stage3"
# The organ probe (kNN and linear on patch tokens; trained on 4 phantoms, scored on the other 4) of the stage-1
# teacher and of 3 random inits of the same model on the same tokens: the seeds' spread is the noise to beat.
echo "== 9/9 organ probe: stage-1 teacher against random init → $RUN_DIR/eval/stage1_organs"
"$PYTHON" -m flexict_jax.evaluate --checkpoint="$RUN_DIR/stage1" --kind=2d --task=organs \
  --dataset="$RUN_DIR/dataset_1.5mm" --patch-size=16 --max-slices=16 --random-init-baselines=3 \
  --out="$RUN_DIR/eval/stage1_organs"
echo "== done: metrics (stages 1-2: eval/knn_balanced_accuracy, stage 3: eval/recall@K) in" \
  "$RUN_DIR/stage{1,2,3}/metrics.jsonl, checkpoints in $RUN_DIR/stage{1,2,3}/checkpoints"
echo "   pictures: $RUN_DIR/pictures/stage1/{pca_axial,pca_coronal,pca_sagittal,similarity_0,curves}.png," \
  "$RUN_DIR/pictures/stage2/… (3D), $RUN_DIR/pictures/stage3/{retrieval_0,curves}.png"
echo "   organ probe, stage-1 teacher vs random init: $RUN_DIR/eval/stage1_organs/results.md"
