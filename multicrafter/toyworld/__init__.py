"""ToyWorld: a procedural multi-subject world with exact masks and a deterministic leakage benchmark.

Used to train and evaluate the embedded `toy` model offline: identities (subjects.py), rendering
(render.py), scene sampling (scenes.py), prompts (prompts.py), dataset making (make_dataset.py), and the
weight-free evaluator (detect.py, evaluate.py) whose scores double as the IPPO rewards on the toy path.
"""

from .evaluate import METRICS, evaluate_batch, evaluate_image, identity_similarity, reference_region
from .make_dataset import RenderedScene, build_sample, contact_sheet, render_sample, write_dataset
from .prompts import make_prompt, parse_prompt
from .render import render_reference, render_scene
from .scenes import LAYOUTS, sample_scene
from .subjects import Identity, by_id, catalogue, identities, similar_pairs, split_of

__all__ = [
    "LAYOUTS", "METRICS", "Identity", "RenderedScene", "build_sample", "by_id", "catalogue", "contact_sheet",
    "evaluate_batch", "evaluate_image", "identities", "identity_similarity", "make_prompt", "parse_prompt",
    "reference_region", "render_reference", "render_sample", "render_scene", "sample_scene", "similar_pairs",
    "split_of", "write_dataset",
]
