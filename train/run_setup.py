"""What every training run does before its first step: the accelerate set-up, claiming the output folder, choosing the
checkpoint to resume from, and loading the model frozen.

Distributed runs are data parallel (DDP, `train/configs/accelerate_ddp.yaml`): only the adapter trains, so every
process holds the frozen base and the small trainable part, and the checkpoint is one file the main process writes.
Sharded set-ups (FSDP, DeepSpeed) are refused, since their weights and optimizer state live split across processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from multicrafter.errors import UserError
from multicrafter.memory import check_modes

from .checkpoints import resolve_resume
from .run_lock import RunLock

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def setup_accelerator(cfg: Any = None, *, mixed_precision: str | None = None,
                      gradient_accumulation_steps: int | None = None, cpu: bool | None = None) -> Accelerator:
    """An accelerate Accelerator from a config object (attributes `mixed_precision` "no"|"bf16"|"fp16",
    `gradient_accumulation_steps`, optional `cpu`) or keywords. Single-process CPU works; `accelerate launch` with
    train/configs/accelerate_ddp.yaml (or torchrun) supplies the data-parallel set-up."""
    mp = mixed_precision or getattr(cfg, "mixed_precision", "no") or "no"
    mp = {"fp32": "no", "none": "no", "bfloat16": "bf16", "float16": "fp16"}.get(mp, mp)
    if mp not in ("no", "bf16", "fp16"):
        raise UserError(f"mixed_precision must be no, bf16 or fp16, got {mp!r}")
    force_cpu = bool(cpu if cpu is not None else getattr(cfg, "cpu", False))
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        force_cpu = True  # torchrun on CPUs: accelerate only sets up gloo (MULTI_CPU) with cpu=True
    if mp == "fp16" and (force_cpu or not torch.cuda.is_available()):
        raise UserError("fp16 mixed precision needs a GPU; use bf16 or no on CPU")
    accum = gradient_accumulation_steps or getattr(cfg, "gradient_accumulation_steps", 1) or 1
    if accum < 1:
        raise UserError(f"gradient_accumulation_steps must be >= 1, got {accum}")
    if torch.cuda.is_available() and not force_cpu and os.environ.get("MULTICRAFTER_CUDNN_SDPA") != "1":
        # Measured on torch 2.11 + cuDNN 9 (H200): the cuDNN SDPA backward fails at FLUX sequence lengths
        # ("mha_graph.execute ... is_good()"); the flash / memory-efficient kernels work. MULTICRAFTER_CUDNN_SDPA=1
        # re-enables cuDNN on stacks where it is fixed.
        torch.backends.cuda.enable_cudnn_sdp(False)
    acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum, cpu=force_cpu)
    if acc.distributed_type in SHARDED:
        raise UserError(f"{acc.distributed_type.value} is not supported: training is single-process or data parallel "
                        "(accelerate launch --config_file train/configs/accelerate_ddp.yaml ...)")
    return acc


def broadcast_from_main(accelerator: Accelerator, obj: Any) -> Any:
    """The main process's `obj` on every process (itself in a one-process run)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """`fn()` run by the main process only, its result on every process; a UserError it raises is raised, with the
    same one line, on every process (so all ranks stop together)."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    result, error = broadcast_from_main(accelerator, (result, error))
    if error:
        raise UserError(error)
    return result


def claim_output_dir(accelerator: Accelerator, output_dir: str | os.PathLike) -> RunLock:
    """The main process locks the output folder (`train.run_lock`); every process raises the same one-line UserError
    when another live run holds it. Call before anything is written there; release the returned lock at the end."""
    lock = RunLock(output_dir)
    note = on_main(accelerator, lock.acquire)
    if note and accelerator.is_main_process:
        print(note)
    return lock


def resume_point(accelerator: Accelerator, output_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint every process continues from: chosen once by the main process (`resolve_resume`), so all ranks
    read the same complete checkpoint."""
    ckpt = on_main(accelerator, lambda: resolve_resume(output_dir, resume))
    return Path(ckpt) if ckpt else None


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def build_model(model: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device | None = None,
                quantize: str = "none"):
    """`tiny` / `toy` / a diffusers FLUX folder or hub id -> a MultiCrafterPipeline (components as attributes:
    transformer, vae, text_encoder(_2), tokenizer(_2), scheduler; `.components` is the dict), everything frozen and in
    eval mode; the trainer unfreezes what it trains. The toy model's shipped default adapter is NOT loaded.

    `quantize` (none | int8 | fp8 | nf4, `multicrafter.memory`) stores the frozen transformer and T5 quantised, as
    QLoRA does: the adapter added on top trains in full precision through the quantised base linears (peft wraps
    torchao and bitsandbytes layers). A mode this machine cannot run is a one-line UserError naming model.quantize."""
    # Imported here: diffusers' Flux pipeline module takes seconds to import and prints warnings, which must not come
    # before a config error's one line.
    from multicrafter import MultiCrafterPipeline

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    try:
        check_modes(quantize)
    except UserError as exc:
        raise UserError(f"model.quantize: {exc}") from None
    pipe = MultiCrafterPipeline.from_pretrained(model, dtype=dtype, device=device, quantize=quantize, adapter=False)
    return freeze(pipe)


def freeze(pipe: Any) -> Any:
    """Every model of the pipeline frozen and in eval mode (the trainer then unfreezes what it trains)."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


__all__ = ["broadcast_from_main", "build_model", "claim_output_dir", "freeze", "on_main", "parse_dtype", "resume_point",
           "setup_accelerator"]
