"""Mixed ODE/SDE rollouts: equal to the stock sampler at a = 0, window-only storage, T evaluations per image, and the
recomputed log-probs equal to the rollout's bit for bit (first GSPO ratio exactly 1)."""

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import AdapterConfig, adapter_parameters, add_adapter
from multicrafter.errors import UserError
from multicrafter.gspo import gspo_loss
from multicrafter.moe_lora import MoELoRAConfig
from multicrafter.rollout import GroupInput, RolloutOptions, encode_group, iter_chunks, rollout, window_log_probs


@pytest.fixture(scope="module")
def pipe():
    p = MultiCrafterPipeline.from_pretrained("tiny")
    add_adapter(p.transformer, AdapterConfig(lora_rank=4, lora_alpha=4.0, moe=MoELoRAConfig(rank=4, alpha=4.0)))
    with torch.no_grad():  # a non-trivial adapter: LoRA B and MoE B away from zero, routing active
        g = torch.Generator().manual_seed(0)
        for prm in adapter_parameters(p.transformer):
            prm.copy_(0.05 * torch.randn(prm.shape, generator=g))
    return p


def _ref(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _opts(**kw):
    base = dict(num_steps=4, height=32, width=32, group_size=4, max_sequence_length=16, noise_level=0.7)
    return RolloutOptions(**{**base, **kw})


def test_zero_noise_rollout_equals_the_pipeline(pipe):
    """a = 0 everywhere: the rollout is the stock Euler sampler, references included, bit for bit."""
    refs = [_ref(1), _ref(2)]
    opts = _opts(noise_level=0.0, same_initial_noise=False, group_size=3)
    ro = rollout(pipe, [GroupInput("a red circle", refs)], range(4), opts, generator=torch.Generator().manual_seed(0))
    init, _ = pipe.prepare_latents(3, 16, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16, num_images_per_prompt=3,
              latents=init, reference_images=refs)
    latents = pipe("a red circle", output_type="latent", **kw).images
    assert torch.equal(ro.final_latents, latents)
    images = pipe("a red circle", output_type="np", **kw).images
    ours = np.stack([np.asarray(im) for im in ro.images])
    assert np.abs(ours.astype(int) - np.round(images * 255).astype(int)).max() <= 1


def test_true_cfg_rollout_equals_the_guided_pipeline(pipe):
    """With true_cfg_scale > 1 the rollout samples exactly what the pipeline samples with true CFG against ""."""
    refs = [_ref(6)]
    opts = _opts(noise_level=0.0, same_initial_noise=False, group_size=2, true_cfg_scale=2.5)
    ro = rollout(pipe, [GroupInput("a red circle", refs)], range(4), opts, generator=torch.Generator().manual_seed(0),
                 decode=False)
    init, _ = pipe.prepare_latents(2, 16, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16, num_images_per_prompt=2,
              latents=init, reference_images=refs, output_type="latent")
    guided = pipe("a red circle", true_cfg_scale=2.5, negative_prompt="", **kw).images
    plain = pipe("a red circle", **kw).images
    assert torch.allclose(ro.final_latents, guided, atol=1e-5) and not torch.allclose(guided, plain, atol=1e-3)
    assert ro.network_evals == 2 * 4 * 2   # two calls per step and image


def test_true_cfg_first_ratio_is_one(pipe):
    opts = _opts(micro_batch=2, true_cfg_scale=3.0)
    ro = rollout(pipe, [GroupInput("a blue square", [_ref(7)])], [1, 2], opts, generator=torch.Generator().manual_seed(5),
                 decode=False)
    for g, sl in iter_chunks(ro):
        assert torch.equal(window_log_probs(pipe.transformer, ro, g, sl).detach(), ro.log_probs[sl])
    with pytest.raises(UserError, match="true_cfg_scale must be >= 1"):
        _opts(true_cfg_scale=0.5)


def test_window_storage_and_network_evaluations(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        ro = rollout(pipe, [GroupInput("a dog", [_ref(3)]), GroupInput("a cat")], [1, 2], _opts(micro_batch=2),
                     generator=torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    assert sum(calls) == 4 * 8 and ro.network_evals == 4 * 8          # T evaluations per image, nothing extra
    assert ro.x_t.shape == (8, 2, 4, 64) and ro.x_next.shape == (8, 2, 4, 64)
    assert ro.log_probs.shape == (8, 2) and ro.log_probs.dtype == torch.float32
    assert ro.x_next.dtype == torch.float32 and torch.isfinite(ro.log_probs).all()
    # consecutive window steps chain: x_t of step 2 is x_{t+1} of step 1 (in the model dtype)
    assert torch.equal(ro.x_t[:, 1], ro.x_next[:, 0].to(ro.x_t.dtype))
    assert len(ro.images) == 8 and ro.images[0].size == (32, 32)
    assert ro.per_sample("prompt") == ["a dog"] * 4 + ["a cat"] * 4


def test_same_initial_noise_is_shared_within_a_group(pipe):
    grp = [GroupInput("a tree")]
    same = rollout(pipe, grp, [2, 3], _opts(same_initial_noise=True), generator=torch.Generator().manual_seed(2))
    diff = rollout(pipe, grp, [2, 3], _opts(same_initial_noise=False), generator=torch.Generator().manual_seed(2))
    # before the window every step is ODE: one x_T per group gives one x_2 for all G images
    assert all(torch.equal(same.x_t[0, 0], same.x_t[k, 0]) for k in range(4))
    assert not torch.equal(diff.x_t[0, 0], diff.x_t[1, 0])
    assert not torch.equal(same.x_next[0, 0], same.x_next[1, 0])      # the SDE step makes them differ


def test_recomputed_log_probs_equal_the_rollout_so_the_first_ratio_is_one(pipe):
    groups = [GroupInput("a red circle", [_ref(4), _ref(5)]), GroupInput("a blue square")]
    ro = rollout(pipe, groups, [0, 1], _opts(micro_batch=2), generator=torch.Generator().manual_seed(3))
    params = adapter_parameters(pipe.transformer)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    for g, sl in iter_chunks(ro):
        lp = window_log_probs(pipe.transformer, ro, g, sl)
        assert lp.requires_grad
        assert torch.equal(lp.detach(), ro.log_probs[sl])
        out = gspo_loss(lp, ro.log_probs[sl], adv[sl])
        assert torch.equal(out.ratio, torch.ones(2))
        out.loss.backward()
    assert all(p.grad is not None for p in params) and sum(float(p.grad.abs().sum()) for p in params) > 0
    for p in params:
        p.grad = None


def test_after_a_step_the_policy_moves(pipe):
    ctx = encode_group(pipe, GroupInput("a green star"), _opts())
    ro = rollout(pipe, [ctx], [1, 2], _opts(), generator=torch.Generator().manual_seed(4))
    params = adapter_parameters(pipe.transformer)
    saved = [p.detach().clone() for p in params]
    try:
        opt = torch.optim.SGD(params, lr=1.0)
        lp = window_log_probs(pipe.transformer, ro, 0, slice(0, 4))
        gspo_loss(lp, ro.log_probs, torch.tensor([1.0, -1.0, 1.0, -1.0])).loss.backward()
        opt.step()
        with torch.no_grad():
            lp2 = window_log_probs(pipe.transformer, ro, 0, slice(0, 4))
        ratio = gspo_loss(lp2, ro.log_probs, torch.ones(4)).ratio
        assert not torch.equal(ratio, torch.ones(4))
        # ascent on A = (+, -, +, -): likelier where A > 0
        assert float((lp2 - ro.log_probs).mean(1)[[0, 2]].mean()) > float((lp2 - ro.log_probs).mean(1)[[1, 3]].mean())
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None


def test_window_outside_the_schedule_is_refused(pipe):
    from multicrafter.errors import UserError

    with pytest.raises(UserError, match="window"):
        rollout(pipe, [GroupInput("x")], [3, 4], _opts(), decode=False)
    with pytest.raises(UserError, match="multiples of 16"):
        _opts(height=40)


def test_first_ratio_is_exact_in_bf16_with_a_wider_model():
    """An fp32 adapter on a bf16 base (the trainer's setting). bench/ippo_step.py repeats this check on its own model,
    where feeding the recompute strided (non-contiguous) slices once changed bf16 bits."""
    from diffusers import FluxTransformer2DModel

    from multicrafter.presets import TINY_TRANSFORMER, build_tiny_components

    comps = build_tiny_components(dtype=torch.bfloat16)
    torch.manual_seed(0)
    wide = FluxTransformer2DModel(**dict(TINY_TRANSFORMER, num_attention_heads=4, attention_head_dim=32,
                                         axes_dims_rope=(8, 12, 12)))
    comps["transformer"] = wide.to(torch.bfloat16).eval().requires_grad_(False)
    p = MultiCrafterPipeline(**comps)
    add_adapter(p.transformer, AdapterConfig(lora_rank=4, lora_alpha=4.0))
    with torch.no_grad():
        for prm in adapter_parameters(p.transformer):
            prm.data = prm.data.float().normal_(0, 0.02)   # fp32 adapter on a bf16 base, as the trainer keeps it
    ro = rollout(p, [GroupInput("a cat", [_ref(6)])], [0, 1], _opts(), generator=torch.Generator().manual_seed(5))
    assert ro.x_t.dtype == torch.bfloat16 and ro.log_probs.dtype == torch.float32
    for g, sl in iter_chunks(ro):
        assert torch.equal(window_log_probs(p.transformer, ro, g, sl).detach(), ro.log_probs[sl])
