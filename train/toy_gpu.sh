#!/usr/bin/env bash
# The toy model's GPU stages inside one fixed time budget (how the shipped toy was trained on a lent GPU, issue 10):
#   1b. the base continued from stage 1's CPU base with large batches (toy_base_gpu.yaml); a 40-step probe measures
#       the step time and the horizon (train.max_steps) is set so the stage ends in time. The probe is the run's own
#       first 40 steps (inside the warm-up, so their LRs do not depend on the horizon): the resumed run is exactly a
#       run with that horizon from step 0, and `--set train.max_steps=N` reproduces it.
#   2.  the three ablation rows (toy_adapter_*.yaml, unchanged budgets) at the same time on the one GPU;
#   3.  IPPO (toy_ippo.yaml) in whatever time is left, cut off at the budget; its checkpoints resume anywhere.
# Each stage's results are packed into $PACK as soon as it ends, so a run stopped at its limit keeps what finished.
#   BUDGET=540 PACK=/tmp/pack bash train/toy_gpu.sh
#   then unpack the tars into runs/ (README, "The embedded toy model", says how the shipped files were made)
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-540}; PACK=${PACK:-runs/gpu_pack}; RUNS=${RUNS:-runs}
ADAPTER_RESERVE=${ADAPTER_RESERVE:-240}   # seconds kept for stage 2 (+ packing) when the base horizon is set
PROBE=${PROBE:-40}; MAX_BASE_STEPS=${MAX_BASE_STEPS:-20000}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[toy_gpu +$(($(date +%s) - START))s] $*"; }
mkdir -p "$PACK"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# 1b. the base, probe first
BASE=(python -m train.pretrain --config train/configs/toy_base_gpu.yaml --output-dir "$RUNS/toy_base_gpu")
"${BASE[@]}" --max-steps "$PROBE" --set output.progress=false ${BASE_SET:-}
SPS=$(python -c "import json, statistics; r = [json.loads(x) for x in open('$RUNS/toy_base_gpu/metrics.jsonl')]
print(statistics.median(x['sec_per_step'] for x in r[1:] or r))")
STEPS=$(python -c "print(max($PROBE + 10, min($MAX_BASE_STEPS, int(($(left) - $ADAPTER_RESERVE - 30) / ($SPS * 1.04)) // 50 * 50)))")
log "probe: ${SPS} s/step -> base horizon ${STEPS} steps"
"${BASE[@]}" --resume --set train.max_steps="$STEPS" --set output.progress=false ${BASE_SET:-}
python -m train.assemble_toy --base "$RUNS/toy_base_gpu/pipeline" --out "$RUNS/toy_gpu"
tar -cf "$PACK/base.tar" -C "$RUNS" toy_gpu/transformer toy_base_gpu/metrics.jsonl toy_base_gpu/samples
log "base packed (step ${STEPS})"

# 2. the three ablation rows, concurrently (each is small; the GPU has room for all three)
pids=()
for row in baseline attn attn_moe; do
  OMP_NUM_THREADS=4 python -m train.pretrain --config "train/configs/toy_adapter_${row}.yaml" \
    --output-dir "$RUNS/toy_adapter_${row}" --resume --set "model.name=$RUNS/toy_base_gpu/pipeline" \
    --set output.progress=false ${ADAPTER_SET:-} > "$PACK/adapter_${row}.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
tar -cf "$PACK/adapters.tar" -C "$RUNS" toy_adapter_{baseline,attn,attn_moe}/adapter \
  toy_adapter_{baseline,attn,attn_moe}/metrics.jsonl toy_adapter_{baseline,attn,attn_moe}/samples \
  -C "$PACK" adapter_baseline.log adapter_attn.log adapter_attn_moe.log
rm "$PACK"/adapter_*.log
log "adapters packed"

# 3. IPPO on attn_moe with the time that is left (checkpoints every save_every steps; --resume continues them)
python -m train.assemble_toy --out "$RUNS/toy_gpu" --update --adapter baseline="$RUNS/toy_adapter_baseline/adapter" \
  --adapter attn="$RUNS/toy_adapter_attn/adapter" --adapter attn_moe="$RUNS/toy_adapter_attn_moe/adapter"
T=$(($(left) - 15))
if [ "$T" -gt 30 ]; then
  MULTICRAFTER_TOY_DIR="$RUNS/toy_gpu" timeout "$T" python -m train.ippo --config train/configs/toy_ippo.yaml \
    --output-dir "$RUNS/toy_ippo" --resume ${IPPO_SET:-} > "$PACK/ippo.log" 2>&1 || log "ippo stopped (rc $?)"
  tar -cf "$PACK/ippo.tar" -C "$RUNS" --exclude='checkpoint-*' toy_ippo -C "$PACK" ippo.log && rm "$PACK/ippo.log"
  last=$(ls -d "$RUNS"/toy_ippo/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  if [ -n "$last" ]; then tar -cf "$PACK/ippo_checkpoint.tar" -C "$RUNS" "toy_ippo/$(basename "$last")"; fi
  log "ippo packed"
fi
log "done"
