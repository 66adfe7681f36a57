#!/usr/bin/env bash
# Memory modes on one GPU in one run, most informative first: inference per quantisation mode at 512 and 1024 px with
# references, attention capture and an adapter (bench/memory_modes.py), nf4 with model offload, then training per
# mode (bench/train_memory.py). Each part has its own timeout, so a slow mode loses only its own rows. nf4 needs
# bitsandbytes in the GPU's Python (otherwise its rows say "refused"). Packages the GPU's Python lacks can be placed
# in .gpu_deps/, which goes first on PYTHONPATH.
# Tables: bench/results/memory_modes_inference.md and bench/results/memory_modes_training.md (or under $OUT if set).
set -u
export PYTHONPATH="$PWD/.gpu_deps:$PWD:${PYTHONPATH:-}"
dest="${OUT:-bench/results}"
mkdir -p "$dest"
python -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "=== inference, every quantisation mode (the smallest first: a timeout cuts the least telling), no offload"
timeout 280 python bench/memory_modes.py --device cuda --modes nf4 int8 fp8 none --offloads none --steps 4 \
    --out "$dest/memory_modes_inference.md" 2>&1 | tail -40
echo "=== inference, nf4 with model offload"
timeout 90 python bench/memory_modes.py --device cuda --modes nf4 --offloads model --sizes 1024 --steps 4 \
    --out "$dest/memory_modes_inference_offload.md" 2>&1 | tail -8
echo "=== training (pre-training and IPPO), nf4 and int8"
timeout 200 python bench/train_memory.py --device cuda --modes nf4 int8 --out "$dest/memory_modes_training.md" 2>&1 | tail -12
