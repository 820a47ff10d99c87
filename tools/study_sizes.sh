#!/usr/bin/env bash
# Encoder vs decoder size (Findings 3-4, Figs. 6-7) in miniature: README, "Encoder vs decoder (Findings 3-4)".
# T-T, M-T and T-M tokenizers (M: 1.5x T's width and depth, vitok.VIT_SIZES) with 16x16 patches on 64x64 dead
# leaves, 600 steps each (the Finding 1 sweep's recipe), at E = 64 (c=4, seed 0) and E = 256 (c=16, seeds 0 and 1);
# then one evaluate.py --sweep: the table, fits per size, the effect of a larger encoder or decoder at each E
# (`sizes` in the JSON, with the spread over seeds) and, with matplotlib, the plot of Figs. 6-7.
#
#   bash tools/study_sizes.sh                     # from the repository root, in the environment of the README
#   OUT=dir POINTS="16:0 16:1 16:2" JOBS=1 bash tools/study_sizes.sh   # other c:seed pairs, one job at a time
# A run resumes: each trainer continues its checkpoint (a finished one exits at once).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-study_sizes}
POINTS=${POINTS:-"4:0 16:0 16:1"}  # c:seed
MODELS=${MODELS:-"T-T M-T T-M"}
STEPS=${STEPS:-600}  # tokenizer steps
NUM_SAMPLES=${NUM_SAMPLES:-1000}  # evaluation images per tokenizer
JOBS=${JOBS:-2}  # trainings at once, one thread each (2 cores)
mkdir -p "$OUT"
pids=()
for cs in $POINTS; do c=${cs%:*}; seed=${cs#*:}
  for m in $MODELS; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
    name="$OUT/${m}_p16_c${c}_s${seed}"
    echo "training $name.pt (log: $name.log)"
    OMP_NUM_THREADS=1 "$PYTHON" "$ROOT/train_ae.py" --preset tiny --model "$m/16" --channels "$c" \
      --steps "$STEPS" --seed "$seed" --ckpt "$name.pt" > "$name.log" 2>&1 &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed training stops here (see its .log)
ckpts=()
for cs in $POINTS; do for m in $MODELS; do ckpts+=("$OUT/${m}_p16_c${cs%:*}_s${cs#*:}.pt"); done; done
"$PYTHON" "$ROOT/evaluate.py" --sweep "${ckpts[@]}" --data deadleaves --num-samples "$NUM_SAMPLES" \
  --plot "$OUT/sizes.png" --json "$OUT/sizes.json"
