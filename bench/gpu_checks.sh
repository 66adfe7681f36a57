#!/usr/bin/env bash
# The FLUX.1-dev-size GPU checks in one run: attention capture cost and the converted UNO LoRA. Packages the GPU's
# Python lacks (diffusers) can be installed into .gpu_deps/, which goes first on PYTHONPATH.
# Results: bench/results/gpu_flux_size_checks.md.
set -u
export PYTHONPATH="$PWD/.gpu_deps:$PWD:${PYTHONPATH:-}"
python -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "=== attention capture at FLUX.1-dev size (no gradient checkpointing)"
timeout 200 python bench/attention_capture.py --flux-size --device cuda --repeats 3 --no-checkpointing 2>&1 | grep -v "float32: \[\]" | tail -8
echo "=== attention capture, gradient checkpointing"
timeout 200 python bench/attention_capture.py --flux-size --device cuda --repeats 3 2>&1 | grep -v "float32: \[\]" | tail -8
echo "=== a random UNO-format rank-512 LoRA, converted and run"
timeout 200 python bench/uno_flux.py --device cuda 2>&1 | tail -8
