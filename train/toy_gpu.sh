#!/usr/bin/env bash
# The GPU recipe that trains the toy within a fixed time budget (BUDGET seconds, for a GPU job with a hard time limit):
#   1.  the large-batch base: the shift-3 base continued with large batches (recipe/base_large_batch.yaml); a PROBE-step
#       probe (40) measures the step time and the horizon (train.max_steps) is set so the stage ends in time. The probe
#       is the run's own first steps (inside the warm-up, so their LRs do not depend on the horizon): the resumed run is
#       exactly a run with that horizon from step 0, and `--set train.max_steps=N` reproduces it.
#   2.  the three ablation rows (toy_adapter_*.yaml, unchanged budgets) at the same time on the one GPU;
#   3.  IPPO (toy_ippo.yaml) in whatever time is left; its checkpoints resume anywhere.
# Every stage is bounded by the budget (train/gpu_budget.sh), so the script always ends by BUDGET seconds, and each
# stage's results are packed into $PACK (one tar per stage or row, written then renamed) as soon as it ends: a cut-off
# stage still leaves its last checkpoint (every 500 adapter steps, every 10 IPPO steps), which `--resume` continues on
# any machine. tests/test_toy_gpu_script.py runs it on a CPU with every stage shrunk and a clock it moves forward.
#   BUDGET=480 PACK=/tmp/pack bash train/toy_gpu.sh          (then untar the packs into runs/)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-480}; PACK=${PACK:-runs/gpu_pack}; RUNS=${RUNS:-runs}
ADAPTER_RESERVE=${ADAPTER_RESERVE:-240}   # seconds kept for stages 2-3 when the base horizon is set
PROBE=${PROBE:-40}; MAX_BASE_STEPS=${MAX_BASE_STEPS:-20000}
LOG_TAG=toy_gpu; source train/gpu_budget.sh   # START, left, log, bounded, pack, latest
mkdir -p "$PACK"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# 1. the base: the probe (dataset written + encoded once, then 40 steps), then the fitted horizon
BASE=(python -m train.pretrain --config train/configs/recipe/base_large_batch.yaml --output-dir "$RUNS/toy_base_gpu"
      --set output.progress=false)
bounded "$ADAPTER_RESERVE" "${BASE[@]}" --max-steps "$PROBE" --set output.log_every=1 ${BASE_SET:-} \
  || { log "probe failed or cut off"; exit 1; }
SPS=$(python -c "import json, statistics; r = [json.loads(x) for x in open('$RUNS/toy_base_gpu/metrics.jsonl')]
print(statistics.median(x['sec_per_step'] for x in r[len(r) // 4:]))") || exit 1
STEPS=$(python -c "print(min($MAX_BASE_STEPS, max($PROBE + 10, int(($(left) - $ADAPTER_RESERVE - 30) / ($SPS * 1.04)) // 50 * 50)))")
log "probe done: ${SPS} s/step -> base horizon ${STEPS} steps"
bounded $((ADAPTER_RESERVE - 60)) "${BASE[@]}" --resume --set train.max_steps="$STEPS" ${BASE_SET:-} \
  || { log "base cut off or failed"; exit 1; }
python -m train.assemble_toy --base "$RUNS/toy_base_gpu/pipeline" --out "$RUNS/toy_gpu" --true-cfg 3
pack base.tar -C "$RUNS" toy_gpu/transformer toy_gpu/text_encoder toy_gpu/text_encoder_2 \
  toy_base_gpu/metrics.jsonl toy_base_gpu/samples
log "base packed (horizon ${STEPS})"

# 2. the three ablation rows, concurrently (each is small; one GPU has room for all three)
pids=()
for row in baseline attn attn_moe; do
  OMP_NUM_THREADS=4 bounded 45 python -m train.pretrain --config "train/configs/toy_adapter_${row}.yaml" \
    --output-dir "$RUNS/toy_adapter_${row}" --resume --set "model.name=$RUNS/toy_base_gpu/pipeline" \
    --set output.progress=false ${ADAPTER_SET:-} > "$RUNS/adapter_${row}.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || log "an adapter run stopped early (rc $?)"; done
for row in baseline attn attn_moe; do
  d="$RUNS/toy_adapter_${row}"; what=adapter
  [ -f "$d/adapter/adapter_config.json" ] || what=$(basename "$(latest "$d")")
  pack "adapter_${row}.tar" -C "$RUNS" "toy_adapter_${row}/${what}" "toy_adapter_${row}/metrics.jsonl" \
    "adapter_${row}.log" && log "packed ${row} (${what})"
done
for row in baseline attn attn_moe; do [ -f "$RUNS/toy_adapter_${row}/adapter/adapter_config.json" ] || exit 1; done

# 3. IPPO on attn_moe with the time that is left
python -m train.assemble_toy --out "$RUNS/toy_gpu" --update --adapter baseline="$RUNS/toy_adapter_baseline/adapter" \
  --adapter attn="$RUNS/toy_adapter_attn/adapter" --adapter attn_moe="$RUNS/toy_adapter_attn_moe/adapter"
if [ "$(left)" -gt 60 ]; then
  MULTICRAFTER_TOY_DIR="$RUNS/toy_gpu" bounded 15 python -m train.ippo --config train/configs/toy_ippo.yaml \
    --output-dir "$RUNS/toy_ippo" --resume ${IPPO_SET:-} > "$RUNS/ippo.log" 2>&1 || log "ippo stopped (rc $?)"
  pack ippo.tar -C "$RUNS" --exclude='checkpoint-*' toy_ippo ippo.log
  last=$(latest "$RUNS/toy_ippo")
  if [ -n "$last" ]; then pack ippo_checkpoint.tar -C "$RUNS" "toy_ippo/$(basename "$last")"; fi
  log "ippo packed"
fi
log "done"
