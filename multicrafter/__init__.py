"""MultiCrafter: high-fidelity multi-subject generation on FLUX (disentangled attention + IPPO).

`from multicrafter import MultiCrafterPipeline` is the entry point; the pipeline is imported lazily so that light
modules (ToyWorld, metrics, the dataset tools) do not pay for importing diffusers.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["MultiCrafterPipeline", "MultiCrafterPipelineOutput"]

if TYPE_CHECKING:
    from .pipeline import MultiCrafterPipeline, MultiCrafterPipelineOutput


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline  # on first use: diffusers takes seconds to import

        return getattr(pipeline, name)
    raise AttributeError(f"module 'multicrafter' has no attribute {name!r}")
