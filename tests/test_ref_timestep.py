"""References at timestep 0 (MOSAIC option): off = stock, on = per-token modulation that only touches references."""

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.presets import build_tiny_components
from multicrafter.ref_timestep import install_ref_timestep
from multicrafter.references import ReferenceOptions


def inputs(t=0.7, n_img=24, n_ref=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, n_img + n_ref, 64, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), t),
                guidance=torch.full((2,), 3.5), img_ids=torch.rand(n_img + n_ref, 3) * 6, txt_ids=torch.zeros(5, 3),
                return_dict=False)


@pytest.fixture()
def transformer():
    return build_tiny_components()["transformer"]


def test_installed_but_off_equals_stock(transformer):
    kw = inputs()
    with torch.no_grad():
        stock = transformer(**kw)[0]
        state = install_ref_timestep(transformer)
        off = transformer(**kw)[0]
        state.enabled, state.n_ref = True, 0
        no_refs = transformer(**kw)[0]
    assert torch.equal(stock, off) and torch.equal(stock, no_refs)


def test_at_t0_the_per_token_path_equals_stock(transformer):
    """When the target is at t = 0 too, both embeddings coincide: the per-token path must reproduce the block."""
    kw = inputs(t=0.0)
    with torch.no_grad():
        stock = transformer(**kw)[0]
        state = install_ref_timestep(transformer)
        state.enabled, state.n_ref = True, 8
        ours = transformer(**kw)[0]
    assert (ours - stock).abs().max() <= 1e-5


def test_refs_at_t0_change_the_target_and_checkpointing_agrees(transformer):
    kw = inputs(t=0.7)
    with torch.no_grad():
        stock = transformer(**kw)[0]
    state = install_ref_timestep(transformer)
    state.enabled, state.n_ref = True, 8
    with torch.no_grad():
        ours = transformer(**kw)[0]
    assert (ours[:, :24] - stock[:, :24]).abs().max() > 1e-4
    # Same result with gradient checkpointing (blocks called positionally), and gradients flow.
    transformer.requires_grad_(True).train().enable_gradient_checkpointing()
    out = transformer(**kw)[0]
    assert (out - ours).abs().max() <= 1e-5
    out.pow(2).mean().backward()
    assert transformer.transformer_blocks[0].norm1.linear.weight.grad.abs().sum() > 0


def test_pipeline_option():
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    ref = [Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))]
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="np")
    shared = pipe("a", reference_images=ref, generator=torch.Generator().manual_seed(0), **kw).images
    zero = pipe("a", reference_images=ref, generator=torch.Generator().manual_seed(0),
                reference_options=ReferenceOptions(long_side_single=64, ref_timestep_zero=True), **kw).images
    again = pipe("a", reference_images=ref, generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(shared - zero).max() > 1e-4
    assert np.array_equal(shared, again)  # the option switches itself off after the call
