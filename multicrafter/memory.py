"""Memory modes for smaller GPUs: weight quantisation of the transformer and T5, CPU offload, VAE tiling.

Quantisation goes through diffusers' own backends: `int8` is torchao int8 weight-only, `fp8` torchao float8
weight-only, `nf4` bitsandbytes 4-bit NF4. Models loaded from a folder or the Hub get a
`PipelineQuantizationConfig`, so weights are quantised as they load; models built in memory (`tiny`) are quantised
in place with torchao's `quantize_` (the same configs). Only `transformer` and `text_encoder_2` (T5) are quantised:
they hold nearly all the weights; CLIP and the VAE stay in the load dtype.

Offload is diffusers': `model` = `enable_model_cpu_offload` (one component on the GPU at a time), `sequential` =
`enable_sequential_cpu_offload` (one layer at a time: least memory, slowest). Both need a CUDA GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UserError

QUANTIZE_MODES = ("none", "int8", "fp8", "nf4")
OFFLOAD_MODES = ("none", "model", "sequential")
QUANTIZED_COMPONENTS = ("transformer", "text_encoder_2")
VAE_TILING_PIXELS = 1024 * 1024                 # above this many output pixels the VAE decodes in tiles

NF4_NEEDS_CUDA = "--quantize nf4 needs a CUDA GPU (bitsandbytes)"
NF4_NEEDS_BNB = "--quantize nf4 needs bitsandbytes: pip install bitsandbytes"
TORCHAO_MISSING = "--quantize {mode} needs torchao: pip install torchao==0.18.0"


def _offload_needs_cuda(mode: str) -> str:
    return f"--offload {mode} needs a CUDA GPU (it moves weights between the CPU and the GPU)"


def check_modes(quantize: str = "none", offload: str = "none", cuda: bool | None = None) -> None:
    """Refuse (one-line UserError) an unknown mode, or a mode this machine cannot run."""
    if quantize not in QUANTIZE_MODES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if offload not in OFFLOAD_MODES:
        raise UserError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if quantize == "nf4":
        if not cuda:
            raise UserError(NF4_NEEDS_CUDA)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(NF4_NEEDS_BNB) from None
    if quantize in ("int8", "fp8"):
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise UserError(TORCHAO_MISSING.format(mode=quantize)) from None
    if offload != "none" and not cuda:
        raise UserError(_offload_needs_cuda(offload))


def _torchao_config(mode: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def pipeline_quantization_config(quantize: str, dtype: torch.dtype | None = None) -> Any | None:
    """diffusers' `PipelineQuantizationConfig` for `from_pretrained` (None for `none`): per-component configs for
    the transformer (diffusers) and T5 (transformers)."""
    if quantize == "none":
        return None
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from diffusers import TorchAoConfig as DiffusersAo
    from diffusers.quantizers import PipelineQuantizationConfig
    from transformers import BitsAndBytesConfig as TransformersBnb
    from transformers import TorchAoConfig as TransformersAo

    if quantize == "nf4":
        kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.bfloat16)
        mapping = {"transformer": DiffusersBnb(**kw), "text_encoder_2": TransformersBnb(**kw)}
    else:
        mapping = {"transformer": DiffusersAo(_torchao_config(quantize)),
                   "text_encoder_2": TransformersAo(_torchao_config(quantize))}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _linear_filter(module: nn.Module, fqn: str) -> bool:
    # 1-d inputs and tiny in-features (the 16-channel VAE side) are not worth a kernel; everything else is
    return isinstance(module, nn.Linear) and module.in_features >= 16


def quantize_in_place(pipe: Any, quantize: str) -> None:
    """Quantise an already-built pipeline's transformer and T5 with torchao (models built in memory)."""
    if quantize == "none":
        return
    if quantize == "nf4":
        raise UserError("--quantize nf4 applies when loading a model folder or hub id, not to an in-memory model")
    from torchao.quantization import quantize_

    for name in QUANTIZED_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            quantize_(module, _torchao_config(quantize), filter_fn=_linear_filter)


def apply_offload(pipe: Any, offload: str) -> None:
    """diffusers' model or sequential CPU offload (no-op for `none`)."""
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Whether a weight is a quantised tensor (torchao subclass, bitsandbytes Params4bit) rather than a plain float
    tensor: such weights cannot take a LoRA merged into them."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor or not data.dtype.is_floating_point or data.dtype.itemsize < 2


def weight_bytes(module: nn.Module | None) -> int:
    """Bytes the module's parameters and buffers occupy (quantised weights at their packed size)."""
    if module is None:
        return 0
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        data = t.data
        if type(data) is torch.Tensor:
            total += data.numel() * data.element_size()
        else:   # tensor subclasses: sum their inner tensors (torchao: qdata + scale)
            inner = getattr(data, "__tensor_flatten__", None)
            if inner is not None:
                names, _ = inner()
                total += sum(getattr(data, n).numel() * getattr(data, n).element_size() for n in names)
            else:
                total += data.numel() * data.element_size()
    return total


__all__ = [
    "OFFLOAD_MODES", "QUANTIZED_COMPONENTS", "QUANTIZE_MODES", "VAE_TILING_PIXELS",
    "apply_offload", "check_modes", "is_quantized_weight", "pipeline_quantization_config", "quantize_in_place",
    "weight_bytes",
]
