"""bench/train_memory.py end to end on tiny shapes on CPU, and its FLUX-size configs resolved (without the GPU)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_memory import _configs, main  # noqa: E402


# bf16 autocast on CPU (as the FLUX pre-training config runs) makes torch note that layer norm cannot fuse
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_tiny_shapes_on_cpu_write_the_table_with_refusals(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "train.md"
    assert main(["--shapes", "tiny", "--device", "cpu", "--modes", "none", "int8", "nf4", "--steps", "1",
                 "--ippo-group", "2", "--ippo-steps", "2", "--out", str(out)]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| quantize")}
    assert rows["nf4"][1] == "refused: --quantize nf4 needs a CUDA GPU (bitsandbytes)"
    for mode in ("none", "int8"):
        weights, adapter, step, peak, rollout, update, ipeak = rows[mode][1:]
        assert float(step) > 0 and float(rollout) > 0 and float(update) > 0
        assert peak == ipeak == "-"                      # no CUDA: no peak to report
    assert float(rows["int8"][1]) < 0.5 * float(rows["none"][1])   # int8 weights under half of fp32
    assert rows["int8"][2] == rows["none"][2]                       # the same fp32 adapter on both bases


def test_the_flux_runs_use_the_24gb_configs_shortened():
    args = argparse.Namespace(ippo_group=4, ippo_steps=8)
    pre, ippo = _configs("flux", "nf4", args)
    assert (pre.model.quantize, pre.model.gradient_checkpointing, pre.adapter.lora_rank) == ("nf4", True, 128)
    assert pre.attention_loss.weight > 0 and pre.data.toyworld.size == 512 and pre.data.toyworld.ref_size == 320
    assert pre.train.gradient_accumulation_steps == 1 and pre.train.mixed_precision == "bf16"
    assert (ippo.model.quantize, ippo.model.adapter, ippo.model.lora_rank) == ("nf4", None, 128)
    assert ippo.model.moe.rank == pre.adapter.moe.rank and ippo.model.moe.num_blocks == pre.adapter.moe.num_blocks
    assert (ippo.sampling.group_size, ippo.sampling.num_steps, ippo.sampling.height) == (4, 8, 512)
    assert ippo.reward.kind == "toy" and ippo.model.gradient_checkpointing
