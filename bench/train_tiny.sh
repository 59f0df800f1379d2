#!/usr/bin/env bash
# Train the embedded default models: a 4096-token byte-level BPE on Python's standard library,
# then tiny-phimoe and tiny-jetmoe (~3.6M parameters each, float32 safetensors < 16 MB) on the
# same corpus, 256-token sequences. Prints each model's held-out perplexity.
#
#   bench/train_tiny.sh [--quick] [OUT_DIR]      (OUT_DIR defaults to runs/tiny)
#
# GPU (the real recipe): 2000 steps x 64 sequences x 256 tokens = 32.8M tokens per model (~12
# passes over the ~2.6M training tokens), bf16 autocast. The models are so small that a step is
# bound by kernel launches (~4.5k ops for PhiMoE, ~7k for JetMoE per step), not FLOPs: about
# 25-45 ms/step on an H200, i.e. ~1-1.5 min per model, ~3-4 min for the whole script with the
# tokenizer (~15 s) and tokenization (~15 s per run).
# --quick: a CPU smoke test of the same pipeline (40 files, 20 steps of 4 x 64 tokens), ~1-2 min.
#
# Re-running continues an interrupted run (--resume auto). Outputs:
#   OUT/tokenizer/                     tokenizer.json, tokenizer_config.json
#   OUT/runs/tiny-{phimoe,jetmoe}/     checkpoints, train_log.jsonl (see docs/training.md)
#   OUT/tiny-{phimoe,jetmoe}/          the final model: config, safetensors, tokenizer (no optimizer state)
set -euo pipefail

QUICK=0
OUT=runs/tiny
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
PROGRESS=false
[ -t 2 ] && PROGRESS=true

if [ "$QUICK" = 1 ]; then
  TOK_ARGS=(--vocab-size 512 --max-files 40)
  TRAIN_ARGS=(--max-files 40 --seq-len 64 --batch-size 4 --max-steps 20 --warmup-steps 5
              --eval-every 10 --save-every 10 --log-every 5 --eval-max-batches 8 --device cpu)
else
  TOK_ARGS=(--vocab-size 4096)
  TRAIN_ARGS=(--seq-len 256 --batch-size 64 --max-steps 2000 --warmup-steps 100
              --eval-every 250 --save-every 500 --log-every 50)
fi

mkdir -p "$OUT"
if [ ! -f "$OUT/tokenizer/tokenizer_config.json" ]; then
  "$PY" -m moetorch train-tokenizer --data stdlib --output "$OUT/tokenizer" "${TOK_ARGS[@]}"
fi

declare -A PPL
for model in tiny-phimoe tiny-jetmoe; do
  echo "=== $model ===" >&2
  start=$(date +%s)
  summary=$("$PY" -m moetorch train --model "$model" --tokenizer "$OUT/tokenizer" --data stdlib \
      --output-dir "$OUT/runs/$model" --resume auto --progress "$PROGRESS" --seed 0 \
      --lr 3e-3 --min-lr-ratio 0.1 --weight-decay 0.1 --grad-clip 1.0 --keep-checkpoints 2 \
      "${TRAIN_ARGS[@]}" | tail -n 1)
  echo "$model: $summary ($(( $(date +%s) - start )) s)" >&2
  PPL[$model]=$("$PY" -c 'import json, sys; print("%.3f" % json.loads(sys.argv[1])["eval_ppl"])' "$summary")
  # The shippable model: the final checkpoint without optimizer state.
  rm -rf "$OUT/$model"
  mkdir -p "$OUT/$model"
  for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    if [ -f "$OUT/runs/$model/latest/$f" ]; then cp "$OUT/runs/$model/latest/$f" "$OUT/$model/"; fi
  done
  chmod 644 "$OUT/$model"/*  # safetensors writes 0600 files; the shipped copy must be world-readable
  size=$(stat -c %s "$OUT/$model/model.safetensors")
  if [ "$QUICK" = 0 ] && [ "$size" -gt 16000000 ]; then
    echo "error: $OUT/$model/model.safetensors is $size bytes (> 16 MB)" >&2
    exit 1
  fi
done

for model in tiny-phimoe tiny-jetmoe; do
  echo "$model held-out perplexity: ${PPL[$model]}  ($OUT/$model)"
done
