#!/usr/bin/env bash
# The device checks of issues 2 and 9 in one run (carry .gpu_deps: diffusers, absent on the GPU image).
set -u
export PYTHONPATH="$PWD/.gpu_deps:$PWD:${PYTHONPATH:-}"
python -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "=== issue 2: attention capture at FLUX.1-dev size (no gradient checkpointing)"
timeout 200 python bench/attention_capture.py --flux-size --device cuda --repeats 3 --no-checkpointing 2>&1 | grep -v "float32: \[\]" | tail -8
echo "=== issue 2: same, gradient checkpointing"
timeout 200 python bench/attention_capture.py --flux-size --device cuda --repeats 3 2>&1 | grep -v "float32: \[\]" | tail -8
