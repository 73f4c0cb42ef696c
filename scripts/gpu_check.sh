#!/usr/bin/env bash
# One prepared GPU check (about 10 minutes on one H100/H200), never run yet: dirl_min has had no
# GPU. Run from the repository root:
#
#     bash scripts/gpu_check.sh                 # SHAPE=sdar-1.7b by default (qwen3-0.6b for a smaller card)
#     DRY_RUN=1 bash scripts/gpu_check.sh       # the same commands on CPU with a toy body (a minute)
#
# It measures, on a randomly initialised model of the checkpoint's shape (real vocabulary and
# tokenizer, bf16):
#   1. SFT and DiPO step time, trained tokens/s, MFU and peak memory, flex_attention vs SDPA
#      (8 responses x 1,024 tokens, gradient checkpointing on; then off, for the memory);
#   2. native rollout tokens/s (a random model is never confident: ~1 token per step);
#   3. trainer vs engine log-prob agreement in bf16 (python -m dirl_min.check);
#   4. if lmdeploy imports: the LMDeploy backend's rollout tokens/s and `dirl_min.check --lmdeploy`.
# Every command's output goes to $OUT (default gpu_check/) as .log and .json files.
set -uo pipefail

SHAPE=${SHAPE:-sdar-1.7b}
OUT=${OUT:-gpu_check}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}

if [ "$DRY_RUN" = 1 ]; then
  SHAPE=toy; DEV=cpu; DTYPE=float32; SIZE=(--responses 2 --response-tokens 16 --threads 1); ATTNS=(sdpa)
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use DRY_RUN=1')" || exit 1
  DEV=cuda; DTYPE=bfloat16; SIZE=(--responses 8 --response-tokens 1024); ATTNS=(flex_attention sdpa)
fi
BENCH=(python -m dirl_min.bench --shape "$SHAPE" --device "$DEV" --dtype "$DTYPE" "${SIZE[@]}")
status=0
run() {  # name, command...: log it, keep going on failure, remember it
  local name=$1; shift
  echo "== $name: $*" >"$OUT/$name.log"
  "$@" >>"$OUT/$name.log" 2>&1 || { echo "   FAILED (see $OUT/$name.log)"; status=1; }
  tail -n 6 "$OUT/$name.log"
}

python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/device.log"
for attn in "${ATTNS[@]}"; do
  run "train_$attn" "${BENCH[@]}" --attn "$attn" --stages sft,dipo --checkpointing on,off --json "$OUT/train_$attn.json"
done
run rollout_native "${BENCH[@]}" --stages rollout --checkpointing on --json "$OUT/rollout_native.json"

MODEL="$OUT/random-$SHAPE"
run save "${BENCH[@]}" --save "$MODEL"
CHECK_DTYPE=bfloat16; [ "$DRY_RUN" = 1 ] && CHECK_DTYPE=float32
run check python -m dirl_min.check --model "$MODEL" --dtype "$CHECK_DTYPE" --max-new-tokens 256

if [ "$DRY_RUN" != 1 ] && python -c "import lmdeploy" 2>/dev/null; then
  run rollout_lmdeploy "${BENCH[@]}" --stages rollout --checkpointing on --lmdeploy "$MODEL" --json "$OUT/rollout_lmdeploy.json"
  run check_lmdeploy python -m dirl_min.check --model "$MODEL" --dtype bfloat16 --max-new-tokens 256 --lmdeploy
else
  echo "lmdeploy not importable (or a dry run): LMDeploy rows skipped (pip install -e '.[lmdeploy]' needs torch <= 2.12.1)" | tee "$OUT/lmdeploy.log"
fi
echo "done (status $status); results in $OUT/"
exit $status
