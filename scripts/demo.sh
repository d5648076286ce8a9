#!/usr/bin/env bash
# `make demo`: vlgen's main job end to end, offline on CPU, with real pretrained parts (see README, "Demo").
# Each step is an ordinary vlgen command; the timings printed at the end are wall-clock seconds. Outputs go below
# the current directory (runs/demo, data/demo-shapes*). DEMO_OVERLAY names one more config file read after the
# demo's own by every command (the tests use it to shrink the run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$HERE/.venv/bin}
CONFIGS=$HERE/configs/demo
OUT=runs/demo
read -r -a OVERLAY <<< "${DEMO_OVERLAY:+--config $DEMO_OVERLAY}"
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
declare -a TIMES=()
step() {  # step NAME COMMAND...: run it and remember how long it took
  local name=$1 start=$SECONDS
  shift
  echo -e "\n=== vlgen demo: $name"
  "$@"
  TIMES+=("$(printf '%-44s %4d s' "$name" $((SECONDS - start)))")
}

rm -rf "$OUT"
CONFIG=(--config "$CONFIGS/shapes_smollm2.yaml" "${OVERLAY[@]}")
step "train (world, encoder, SmolLM2 on first use)" "$BIN/vlgen" fit "${CONFIG[@]}"
step "test on the held-out split" "$BIN/vlgen" test "${CONFIG[@]}" --config "$CONFIGS/test.yaml" \
  --ckpt_path $OUT/fit/checkpoints/last.ckpt
step "zero-shot VQA on held-out questions" "$BIN/vlgen" test "${CONFIG[@]}" --config "$CONFIGS/vqa.yaml" \
  --ckpt_path $OUT/fit/checkpoints/last.ckpt
step "question-only baseline (blank pictures)" "$BIN/vlgen" test "${CONFIG[@]}" --config "$CONFIGS/vqa.yaml" \
  --ckpt_path $OUT/fit/checkpoints/last.ckpt --model.init_args.blank_images true \
  --trainer.logger.init_args.version vqa-blank
step "caption scikit-image's sample photos" "$BIN/vlgen" predict "${CONFIG[@]}" --config "$CONFIGS/predict.yaml" \
  --ckpt_path $OUT/fit/checkpoints/last.ckpt --data.init_args.predict_dir pkg:skimage/data

echo -e "\n=== vlgen demo: held-out results"
"$BIN/vlgen" report $OUT/test --world data/demo-shapes --samples 8
echo -e "\n=== vlgen demo: zero-shot VQA (the captioner was never trained on a question)"
"$BIN/vlgen" report $OUT/vqa --samples 4
echo -e "\n=== vlgen demo: the same questions with every picture blank (what the LLM guesses from the question alone)"
"$BIN/vlgen" report $OUT/vqa-blank --samples 0
echo -e "\n=== vlgen demo: captions of ordinary photos (a model trained on coloured shapes: the path works, the words do not)"
"$BIN/vlgen" report $OUT/predict --samples 8
echo -e "\n=== vlgen demo: where things are"
echo "  checkpoint      $OUT/fit/checkpoints/last.ckpt"
echo "  test results    $OUT/test/metrics.json, $OUT/test/predictions.jsonl"
echo "  VQA results     $OUT/vqa/metrics.json, $OUT/vqa/vqa_submission.json, $OUT/vqa-blank/metrics.json"
echo "  W&B (offline)   $(ls -d $OUT/wandb/offline-run-* 2>/dev/null | tr '\n' ' ')(upload with: wandb sync DIR)"
echo -e "\n=== vlgen demo: time per step"
printf '  %s\n' "${TIMES[@]}"
if [ -f $OUT/fit/time_budget.json ]; then  # written by the fit's vlgen.callbacks.TimeBudget
  echo "  training: $("$BIN/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["text"])' $OUT/fit/time_budget.json)"
fi
