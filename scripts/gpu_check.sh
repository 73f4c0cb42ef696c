#!/usr/bin/env bash
# The GPU check for a short slot on one H100/H200 (at most 9 minutes for the default shape).
# Run from the repository root:
#
#     bash scripts/gpu_check.sh                 # SHAPE=sdar-1.7b by default (qwen3-0.6b for a smaller card)
#     DRY_RUN=1 bash scripts/gpu_check.sh       # every stage on CPU with a toy shape
#
# Stages, each under its own time limit, each written to $OUT/<stage>.json as soon as it ends
# (a failed or hung stage is recorded and the next one runs), on a randomly initialised model of
# the checkpoint's shape (real vocabulary and tokenizer, bf16):
#   train_flex_attention, train_sdpa: SFT and DiPO step time, trained tokens/s, MFU and peak
#     memory (8 responses x 1,024 tokens, gradient checkpointing on, then off);
#   rollout_native: native rollout tokens/s (a random model is never confident: ~1 token per step);
#   save, check: trainer vs engine log-prob agreement in bf16 (python -m dirl_min.check);
#   pytest_gpu: python -m pytest -m gpu;
#   rollout_lmdeploy, check_lmdeploy: where lmdeploy is installed (skipped, saying so, where not).
# At the end: $OUT/summary.json and a table. Settings: OUT (default gpu_check/), SHAPE, DRY_RUN,
# BUDGET_S (seconds for the whole check; dirl_min/speed/gpu_check.py says how it is sized).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD}
exec python -m dirl_min.speed.gpu_check "$@"
