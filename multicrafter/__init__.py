"""MultiCrafter: high-fidelity multi-subject generation on FLUX (disentangled attention + IPPO).

`from multicrafter import MultiCrafterPipeline` is the entry point; the pipeline is imported lazily so that light
modules (ToyWorld, metrics, the dataset tools) do not pay for importing diffusers.
"""

import logging
import warnings
from typing import TYPE_CHECKING

# diffusers imports torchao (the int8/fp8 memory modes) when it is installed; on a machine without its CUDA kernels
# torchao logs each missing kernel, trips a torch deprecation notice and diffusers adds a notice of its own. They are
# import-time noise, not errors, and would otherwise precede every command's output.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# peft warns that a LoRA on torchao weights cannot be merged; nothing here merges into quantised weights
# (adapters.fuse_lora skips them), so the warning would only mislead.
warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")

__version__ = "0.1.0"
__all__ = ["MultiCrafterPipeline", "MultiCrafterPipelineOutput"]

if TYPE_CHECKING:
    from .pipeline import MultiCrafterPipeline, MultiCrafterPipelineOutput


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline  # on first use: diffusers takes seconds to import

        return getattr(pipeline, name)
    raise AttributeError(f"module 'multicrafter' has no attribute {name!r}")
