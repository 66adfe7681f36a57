#!/usr/bin/env bash
# The embedded toy model, end to end, with the real training scripts (docs/toy_model.md). Every stage resumes:
# re-running the script continues where it stopped.
#   bash train/toy_recipe.sh                       # the real recipe (config step counts; hours on a CPU)
#   SMOKE=1 bash train/toy_recipe.sh               # a few steps of every stage into runs/toy_smoke (checks the chain)
#   BASE_SET="--set data.batch_size=128 --set train.max_steps=4000" bash train/toy_recipe.sh   # extra overrides per
#   stage (BASE_SET, ADAPTER_SET, IPPO_SET), e.g. a larger batch and fewer steps on a GPU
#   BASE_GPU=1 ...                                 # adds the large-batch base (recipe/base_large_batch.yaml) on a GPU;
#                                                    see train/toy_gpu.sh
#   BASE_HIGHNOISE=3 ...                           # adds N rounds of recipe/base_highnoise.yaml after it
#                                                    (the high-noise base, measured in docs/report.md)
#   What multicrafter/assets/toy ships (the large-batch base on a GPU, everything else on a CPU; its TRAINING.md):
#   BASE_GPU=1 BASE_GPU_SET="--set train.max_steps=450" BASE_HIGHNOISE=3 ADAPTER_SET="--set output.checkpoint_every=250"
#     bash train/toy_recipe.sh
#   (rows with logit-normal timesteps instead: --set train.timesteps.scheme=logit_normal --set train.timesteps.shift=null)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SMOKE:-}" ]; then
  RUNS=${RUNS:-runs/toy_smoke}; OUT=${OUT:-$RUNS/assembled}; EVAL_N=${EVAL_N:-4}; FIGS=${FIGS:-$RUNS}
  BASE_STEPS=${BASE_STEPS:-3}; ADAPTER_STEPS=${ADAPTER_STEPS:-2}; IPPO_STEPS=${IPPO_STEPS:-1}
  SMALL=(--set data.toyworld.n=16 --set "data.toyworld.folder=$RUNS/toyworld_train" --set data.batch_size=4
         --set data.num_validation=1 --set output.validation_steps=2)
  SMALL_IPPO=(--set prompts.toyworld.n=4 --set "prompts.toyworld.folder=$RUNS/toyworld_ippo" --set sampling.num_steps=4
              --set window.size=1)
else
  RUNS=${RUNS:-runs}; OUT=${OUT:-multicrafter/assets/toy}; EVAL_N=${EVAL_N:-200}; FIGS=${FIGS:-docs}
  SMALL=(); SMALL_IPPO=()
fi
steps() { if [ -n "${1:-}" ]; then echo "--max-steps $1"; fi; }

# 0. The VAE is committed (multicrafter/assets/toy_vae); remake it with: python -m train.vae --config train/configs/recipe/vae.yaml
# 1. Base: full-weight flow matching with references from the start (an ICL-pretrained base, as UNO's FLUX).
if [ -n "${BASE_HISTORY:-}" ]; then
  # How the shipped base was actually trained (the cosine horizon was shortened twice during training; resumes
  # are exact, so this replays it): 20000-step horizon to 4500, 12000 to 7000, then 9500 to the end.
  python -m train.pretrain --config train/configs/recipe/base.yaml --output-dir "$RUNS/toy_base" --resume \
    --set train.max_steps=20000 --set output.validation_guidance=3.5 --max-steps 4500
  python -m train.pretrain --config train/configs/recipe/base.yaml --output-dir "$RUNS/toy_base" --resume \
    --set train.max_steps=12000 --max-steps 7000
fi
python -m train.pretrain --config train/configs/recipe/base.yaml --output-dir "$RUNS/toy_base" --resume \
  $(steps "${BASE_STEPS:-}") "${SMALL[@]}" ${BASE_SET:-}
# 1b. The text-trained base (recipe/base_text.yaml: the random frozen T5 was a bag of words).
python -m train.pretrain --config train/configs/recipe/base_text.yaml --output-dir "$RUNS/toy_base_text" --resume \
  --set "model.name=$RUNS/toy_base/pipeline" $(steps "${BASE_STEPS:-}") "${SMALL[@]}" ${BASE_TEXT_SET:-}
# 1c. The shift-3 base: high-noise steps emphasised (recipe/base_shift.yaml: the text-trained base decided
#     silhouettes badly at t > 0.75, see `python -m multicrafter.eval denoise`); the large-batch stage continues it.
python -m train.pretrain --config train/configs/recipe/base_shift.yaml --output-dir "$RUNS/toy_base_shift" --resume \
  --set "model.name=$RUNS/toy_base_text/pipeline" $(steps "${BASE_STEPS:-}") "${SMALL[@]}" ${BASE_SHIFT_SET:-}
START_BASE="$RUNS/toy_base_shift/pipeline"
if [ -n "${BASE_GPU:-}" ]; then
  # 1d. (on a GPU) the large-batch base: the base continued at batch 256 (recipe/base_large_batch.yaml;
  # train/toy_gpu.sh runs this stage and the next ones inside a time budget and fits this stage's horizon to it:
  # pass the horizon it printed, BASE_GPU_SET="--set train.max_steps=N")
  python -m train.pretrain --config train/configs/recipe/base_large_batch.yaml --output-dir "$RUNS/toy_base_gpu" --resume \
    --set "model.name=$START_BASE" "${SMALL[@]}" ${BASE_GPU_SET:-}
  START_BASE="$RUNS/toy_base_gpu/pipeline"
fi
for round in $(seq 1 "${BASE_HIGHNOISE:-0}"); do
  # 1e. The high-noise base (round 3 is what multicrafter/assets/toy ships): the base continued with 84 % of its steps near pure
  #     noise (recipe/base_highnoise.yaml, shift 8), where bench/sdedit_shape.py found the outlines are lost; each round
  #     restarts the schedule from the previous round's export with the next seed (13, 14, ...).
  python -m train.pretrain --config train/configs/recipe/base_highnoise.yaml --output-dir "$RUNS/toy_base_highnoise$round" \
    --resume --set "model.name=$START_BASE" --set train.seed=$((12 + round)) $(steps "${BASE_STEPS:-}") \
    "${SMALL[@]}" ${BASE_HIGHNOISE_SET:-}
  START_BASE="$RUNS/toy_base_highnoise$round/pipeline"
done
# 2. The ablation rows, all from the same base with the same budget (ADAPTER_STEPS=1000 stops each at step 1000 of
#    its 2000-step schedule; resuming without it finishes the schedule).
for row in baseline attn attn_moe; do
  python -m train.pretrain --config "train/configs/toy_adapter_${row}.yaml" --output-dir "$RUNS/toy_adapter_${row}" \
    --resume $(steps "${ADAPTER_STEPS:-}") --set "model.name=$START_BASE" "${SMALL[@]}" ${ADAPTER_SET:-}
done
python -m train.assemble_toy --base "$START_BASE" --out "$OUT" \
  --adapter baseline="$RUNS/toy_adapter_baseline/adapter" --adapter attn="$RUNS/toy_adapter_attn/adapter" \
  --adapter attn_moe="$RUNS/toy_adapter_attn_moe/adapter" --true-cfg 3
# 3. IPPO on attn_moe: the default adapter (it ties the bare base with less leakage; docs/report.md).
MULTICRAFTER_TOY_DIR="$OUT" python -m train.ippo --config train/configs/toy_ippo.yaml --output-dir "$RUNS/toy_ippo" \
  --resume $(steps "${IPPO_STEPS:-}") "${SMALL_IPPO[@]}" ${IPPO_SET:-}
python -m train.assemble_toy --out "$OUT" --update --adapter ippo="$RUNS/toy_ippo/adapter" --default-adapter ippo
# 4. The ablation table on held-out identities (mean and std over three seeds).
for row in baseline attn attn_moe ippo; do
  MULTICRAFTER_TOY_DIR="$OUT" python -m multicrafter.eval toy --model toy --adapter "$row" --n "$EVAL_N" \
    --seeds 0,1,2 --json "$RUNS/eval_${row}.json" --save-images "$RUNS/eval_images/$row"
done
# 5. README figures: the same held-out scenes across the four adapters, and attention without / with the Dice loss.
MULTICRAFTER_TOY_DIR="$OUT" python -m multicrafter.eval figures --images "$RUNS/eval_images" --scenes "$((EVAL_N < 8 ? EVAL_N : 8))" \
  --sheet "$FIGS/toy_ablation_sheet.png" --attention "$FIGS/toy_attention_dice.png"
