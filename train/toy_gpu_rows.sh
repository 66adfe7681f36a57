#!/usr/bin/env bash
# The GPU recipe that trains several adapter rows of the toy at once within a fixed time budget (BUDGET seconds, for a
# GPU job with a hard time limit), then scores each on held-out scenes on that GPU. ROWS holds one row per line:
#   NAME CONFIG [--set KEY=VALUE ...]
# Each row runs `python -m train.pretrain --config train/configs/CONFIG.yaml --output-dir $RUNS/NAME --resume
#   --set model.name=$BASE $COMMON_SET <the row's sets>` (all rows at once, after a 1-step run that writes the data
# and the encoding cache they share) and is then scored by `python -m multicrafter.eval toy --model toy --adapter
# $RUNS/NAME/adapter $EVAL_ARGS` (all at once; EVAL_BASE=1 adds the base, --no-adapter). IPPO_FROM=NAME then runs IPPO
# (toy_ippo.yaml + $IPPO_SET) from that row's adapter in the time left. Rerunning continues every row (`--resume`).
# Every stage is bounded by the budget (train/gpu_budget.sh), so the script ends by BUDGET seconds, and each stage is
# packed into $PACK as it ends: rows.tar (each row's adapter, or its last checkpoint if cut off, metrics and log),
# evals.tar (eval_NAME.json), ippo.tar and ippo_checkpoint.tar; a tar over SPLIT_MB is cut into NAME.00, NAME.01, ...
# (`cat NAME.* | tar -x`). $PACK never holds a half-written file.
# The rows share the host's CPU cores as well as the GPU: with 16 cores, 8 rows at once ran each 2-4x slower than 5
# rows at once (bench/results/gpu_toy_rows_capacity.md); 8 evaluations of 200 scenes x 3 seeds at once took ~2 minutes.
#   BUDGET=480 PACK=/tmp/pack ROWS=$'baseline toy_adapter_baseline\nattn toy_adapter_attn' bash train/toy_gpu_rows.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-480}; PACK=${PACK:-runs/gpu_pack}; RUNS=${RUNS:-runs}; BASE=${BASE:-toy}
EVAL_RESERVE=${EVAL_RESERVE:-150}   # seconds kept for the evaluations when the rows train
EVAL_ARGS=${EVAL_ARGS:---true-cfg 3 --n 200 --seeds 0,1,2 --prompts positions}
ROWS=${ROWS:?one row per line: NAME CONFIG [--set KEY=VALUE ...]}
LOG_TAG=toy_gpu_rows; source train/gpu_budget.sh   # START, left, log, bounded, pack, latest
mkdir -p "$PACK" "$RUNS"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
names=(); sets=(); rests=()
while read -r name config rest; do
  [ -n "$name" ] || continue
  [ -f "train/configs/$config.yaml" ] || { log "row $name: no train/configs/$config.yaml"; exit 2; }
  names+=("$name"); sets+=("--config train/configs/$config.yaml --output-dir $RUNS/$name"); rests+=("$rest")
done <<< "$ROWS"
[ "${#names[@]}" -gt 0 ] || { log "ROWS names no row"; exit 2; }

# the data and the encoding cache, written once (a 1-step run of the first row), then every row at once
rm -rf "$RUNS/_prepare"
# shellcheck disable=SC2086  # the sets are words on purpose
bounded "$EVAL_RESERVE" python -m train.pretrain ${sets[0]} --output-dir "$RUNS/_prepare" --max-steps 1 \
  --set "model.name=$BASE" --set output.progress=false ${COMMON_SET:-} ${rests[0]} > "$RUNS/_prepare.log" 2>&1 \
  || { log "preparing the data failed (rc $?)"; tail -5 "$RUNS/_prepare.log"; exit 1; }
log "data and encodings ready"
pids=()
for i in "${!names[@]}"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=2 bounded "$EVAL_RESERVE" python -m train.pretrain ${sets[$i]} --resume --set "model.name=$BASE" \
    --set output.progress=false ${COMMON_SET:-} ${rests[$i]} > "$RUNS/${names[$i]}.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || log "row ${names[$i]} stopped early (rc $?)"; done
done_rows=(); members=()
for name in "${names[@]}"; do
  what=adapter
  [ -f "$RUNS/$name/adapter/adapter_config.json" ] || what=$(basename "$(latest "$RUNS/$name")")
  [ -n "$what" ] && members+=("$name/$what"); [ -f "$RUNS/$name/metrics.jsonl" ] && members+=("$name/metrics.jsonl")
  log "row $name: ${what:-nothing saved}"
  [ "$what" = adapter ] && done_rows+=("$name")
done
pack rows.tar -C "$RUNS" "${members[@]}" $(cd "$RUNS" && ls -- *.log) && log "rows packed"

# the evaluations at once, then IPPO in what is left
rm -rf "$RUNS/evals"; mkdir -p "$RUNS/evals"; pids=()
[ "${EVAL_BASE:-0}" = 1 ] && { bounded 15 python -m multicrafter.eval toy --model toy --no-adapter $EVAL_ARGS \
  --json "$RUNS/evals/eval_base.json" > "$RUNS/eval_base.log" 2>&1 & pids+=($!); }
for name in "${done_rows[@]}"; do
  # shellcheck disable=SC2086
  bounded 15 python -m multicrafter.eval toy --model toy --adapter "$RUNS/$name/adapter" $EVAL_ARGS \
    --json "$RUNS/evals/eval_$name.json" > "$RUNS/eval_$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || log "an evaluation stopped early (rc $?)"; done
log "evaluations: $(ls "$RUNS/evals" | grep -c '^eval_.*json$') written"
pack evals.tar -C "$RUNS" evals $(cd "$RUNS" && ls -- eval_*.log)
if [ "${IPPO_FROM:-}" ] && [ -f "$RUNS/$IPPO_FROM/adapter/adapter_config.json" ] && [ "$(left)" -gt 45 ]; then
  # shellcheck disable=SC2086
  bounded 15 python -m train.ippo --config train/configs/toy_ippo.yaml --output-dir "$RUNS/ippo_$IPPO_FROM" --resume \
    --set "model.adapter=$RUNS/$IPPO_FROM/adapter" ${IPPO_SET:-} > "$RUNS/ippo_$IPPO_FROM.log" 2>&1 \
    || log "ippo stopped (rc $?)"
  last=$(latest "$RUNS/ippo_$IPPO_FROM")
  pack ippo.tar -C "$RUNS" --exclude='checkpoint-*' "ippo_$IPPO_FROM" "ippo_$IPPO_FROM.log" && log "ippo packed"
  [ -n "$last" ] && pack ippo_checkpoint.tar -C "$RUNS" "ippo_$IPPO_FROM/$(basename "$last")"
fi
log "done"
