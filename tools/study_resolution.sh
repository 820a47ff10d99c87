#!/usr/bin/env bash
# Resolution vs E (Fig. 4) in miniature: README, "Resolution vs E (Fig. 4)".
# T-T tokenizers with 8x8 patches on dead leaves at 32x32 (16 tokens) and 64x64 (64 tokens), c = 1, 4 and 16 at
# each (E = 16, 64, 256 and 64, 256, 1024: pairs with equal pixels per float), 600 steps each; one evaluate.py
# --sweep over both resolutions (a PSNR line on log2 E per resolution; with matplotlib Fig. 4's plot); then
# tools/resolution_ratio.py: the E each resolution needs for one PSNR and their ratio (the paper: 4x for 2x the side).
#
#   bash tools/study_resolution.sh                # from the repository root, in the environment of the README
#   OUT=dir CHANNELS="1 2 4 8 16" JOBS=1 bash tools/study_resolution.sh
# A run resumes: each trainer continues its checkpoint (a finished one exits at once).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-study_resolution}
SIZES=${SIZES:-"32 64"}
CHANNELS=${CHANNELS:-"1 4 16"}
STEPS=${STEPS:-600}  # tokenizer steps
NUM_SAMPLES=${NUM_SAMPLES:-1000}  # evaluation images per tokenizer
JOBS=${JOBS:-2}  # trainings at once, one thread each (2 cores)
mkdir -p "$OUT"
pids=() ckpts=()
for s in $SIZES; do for c in $CHANNELS; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
  name="$OUT/T-T_p8_s${s}_c${c}"
  ckpts+=("$name.pt")
  echo "training $name.pt (log: $name.log)"
  OMP_NUM_THREADS=1 "$PYTHON" "$ROOT/train_ae.py" --preset tiny --model T-T/8 --channels "$c" --image-size "$s" \
    --steps "$STEPS" --ckpt "$name.pt" > "$name.log" 2>&1 &
  pids+=($!)
done; done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed training stops here (see its .log)
"$PYTHON" "$ROOT/evaluate.py" --sweep "${ckpts[@]}" --data deadleaves --num-samples "$NUM_SAMPLES" \
  --plot "$OUT/resolution.png" --json "$OUT/sweep.json"
"$PYTHON" "$ROOT/tools/resolution_ratio.py" "$OUT/sweep.json" --json "$OUT/ratio.json"
