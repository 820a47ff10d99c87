#!/usr/bin/env bash
# Generation vs E (Finding 2, Fig. 5) in miniature: README, "Generation vs E (Finding 2)".
# T-T tokenizers on 32x32 synthetic shapes (labelled: the DiT is class-conditional) with 8x8 patches (16 tokens;
# c = 4, 16, 64: E = 64, 256, 1024) and 16x16 patches (4 tokens; c = 16, 64: E = 64, 256), 600 steps each; a tiny
# DiT on each one's latents (train_dit.py --preset tiny, 1,000 steps); the tokenizers' reconstruction (evaluate.py
# --sweep) and the DiTs' samples scored by tools/gen_proxy.py: class accuracy and classifier FD (a proxy, not FID;
# gFID too if the FID Inception file is in the torch hub cache), with Fig. 5's plot.
#
#   bash tools/study_generation.sh                # from the repository root, in the environment of the README
#   OUT=dir POINTS="8:4 8:16" DIT_STEPS=1500 JOBS=1 bash tools/study_generation.sh
# A run resumes: each trainer continues its checkpoint (a finished one exits at once).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-study_generation}
POINTS=${POINTS:-"8:4 8:16 8:64 16:16 16:64"}  # p:c
DIT_STEPS=${DIT_STEPS:-1000}
STEPS=${STEPS:-600}  # tokenizer steps
NUM_SAMPLES=${NUM_SAMPLES:-1000}  # evaluation images per tokenizer
GEN_SAMPLES=${GEN_SAMPLES:-500}  # class-balanced samples per DiT
JOBS=${JOBS:-2}  # points at once, one thread each (2 cores)
mkdir -p "$OUT"
pids=() aes=() dits=()
for pc in $POINTS; do p=${pc%:*}; c=${pc#*:}
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
  ae="$OUT/ae_p${p}_c${c}" gen="$OUT/dit_p${p}_c${c}"
  aes+=("$ae.pt") dits+=("$gen.pt")
  echo "training $ae.pt, then $gen.pt (logs: $ae.log, $gen.log)"
  ( export OMP_NUM_THREADS=1
    "$PYTHON" "$ROOT/train_ae.py" --preset tiny --data synthetic --image-size 32 --model "T-T/$p" --channels "$c" \
      --steps "$STEPS" --ckpt "$ae.pt" > "$ae.log" 2>&1
    "$PYTHON" "$ROOT/train_dit.py" --preset tiny --ae-ckpt "$ae.pt" --steps "$DIT_STEPS" --ckpt "$gen.pt" \
      > "$gen.log" 2>&1 ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed training stops here (see its .log)
"$PYTHON" "$ROOT/evaluate.py" --sweep "${aes[@]}" --data synthetic --num-samples "$NUM_SAMPLES" \
  --plot "$OUT/reconstruction.png" --json "$OUT/reconstruction.json"
"$PYTHON" "$ROOT/tools/gen_proxy.py" "${dits[@]}" --num-samples "$GEN_SAMPLES" --json "$OUT/generation.json" \
  --plot "$OUT/generation.png"
