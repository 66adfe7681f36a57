"""MoE-LoRA: identity at init, top-k routing, gradient flow, load-balance loss, switches, state dict round trip."""

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from multicrafter.errors import UserError
from multicrafter.moe_lora import (
    MoELoRAConfig,
    MoELoRALinear,
    default_target_regex,
    inject_moe_lora,
    load_moe_state_dict,
    moe_aux_loss,
    moe_expert_counts,
    moe_modules,
    moe_parameters,
    moe_state_dict,
    remove_moe_lora,
    set_merged_experts,
    set_moe_enabled,
)

IMPLS = ["dense", "grouped"]


def tiny_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def tiny_inputs(seed: int = 1, tokens: int = 16, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                guidance=torch.tensor([3.5]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


def run(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(**kw))[0]


def randomize_b(model: nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for m in moe_modules(model).values():
            m.expert_B.normal_(0, std)


def layer(impl: str, top_k: int = 1, rank: int = 3, **kw) -> MoELoRALinear:
    torch.manual_seed(0)
    m = MoELoRALinear(nn.Linear(8, 12), num_experts=4, top_k=top_k, rank=rank, alpha=6.0, impl=impl, **kw)
    with torch.no_grad():
        m.expert_B.normal_()
    return m


def reference_output(m: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula token by token: base(h) + Σ_topk softmax(top logits)_i (α/r) B_i A_i h."""
    h = x.reshape(-1, m.in_features)
    rows = []
    for t in range(h.shape[0]):
        logits = m.router.weight @ h[t]
        val, idx = logits.topk(m.top_k)
        p = val.softmax(0)
        y = m.base(h[t])
        for j in range(m.top_k):
            e = idx[j]
            y = y + p[j] * m.scaling * (m.expert_B[e].t() @ (m.expert_A[e] @ h[t]))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], m.out_features)


def test_default_regex_is_anchored_and_picks_output_side_ffn():
    model = tiny_transformer()
    names = inject_moe_lora(model, MoELoRAConfig(num_blocks=1))
    assert names == ["single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out"]
    assert type(model.proj_out) is nn.Linear  # the top-level output projection is never hit
    both = default_target_regex(tiny_transformer(), MoELoRAConfig(blocks="both", num_blocks=5))
    names = inject_moe_lora(tiny_transformer(), MoELoRAConfig(target_regex=both))
    assert sorted(names) == sorted([f"transformer_blocks.{i}.ff.net.{j}" for i in (0, 1) for j in ("0.proj", "2")]
                                   + [f"single_transformer_blocks.{i}.{n}" for i in (0, 1)
                                      for n in ("proj_mlp", "proj_out")])


@pytest.mark.parametrize("impl", IMPLS)
def test_output_equals_base_at_init(impl):
    base = tiny_transformer()
    model = copy.deepcopy(base)
    inject_moe_lora(model, MoELoRAConfig(blocks="both", impl=impl))
    assert len(moe_modules(model)) == 8
    assert torch.equal(run(model), run(base))
    set_merged_experts(model, True)   # as a fused inference pipeline: each expert merged, equal up to rounding
    assert torch.allclose(run(model), run(base), atol=1e-5)
    set_merged_experts(model, False)
    randomize_b(model)
    assert not torch.allclose(run(model), run(base), atol=1e-4)  # the adapter is live once B moves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_paper_formula_and_routes_top_k(impl, top_k):
    m = layer(impl, top_k=top_k)
    x = torch.randn(2, 7, 8)
    assert torch.allclose(m(x), reference_output(m, x), atol=1e-5)
    counts = m.last_counts
    assert counts.sum().item() == 14 * top_k  # every token sent to exactly top_k experts
    expected = torch.bincount((x.reshape(-1, 8) @ m.router.weight.t()).topk(top_k, -1).indices.reshape(-1),
                              minlength=4)
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_reach_only_routed_experts_and_router(impl):
    m = layer(impl)
    x = torch.randn(1, 2, 8)  # two tokens: at most two of the four experts are routed
    m(x).square().sum().backward()
    routed = m.last_counts > 0
    assert 1 <= routed.sum() <= 2
    for e in range(4):
        grads = (m.expert_A.grad[e], m.expert_B.grad[e])
        assert all((g.abs().sum() > 0) == bool(routed[e]) for g in grads), f"expert {e}"
    assert m.router.weight.grad.abs().sum() > 0
    assert m.base.weight.grad is None and not m.base.weight.requires_grad


def test_without_straight_through_top1_router_gets_no_task_gradient():
    """The paper's gate Softmax(TopK(·, 1)) is the constant 1: the task loss alone cannot train the router."""
    m = layer("dense", straight_through_router=False)
    y_st = layer("dense")(torch.ones(3, 8))
    y = m(torch.ones(3, 8))
    assert torch.equal(y, y_st)  # the straight-through term changes gradients only
    y.square().sum().backward()
    assert m.router.weight.grad is None or m.router.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_and_grouped_agree_on_outputs_and_gradients(top_k):
    x = torch.randn(3, 5, 8)
    results = []
    for impl, fuse in (("dense", True), ("dense", False), ("grouped", None)):  # fuse=False: the GPU code path
        m = layer(impl, top_k=top_k)
        m.fuse_router = fuse
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, 12)).sum().backward()
        results.append((y, xi.grad, m.router.weight.grad, m.expert_A.grad, m.expert_B.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5)


def test_load_balance_loss_finite_differentiable_and_switch_formula():
    m = layer("dense")
    x = torch.randn(10, 8)
    m(x)
    loss = moe_aux_loss(m)
    probs = (x @ m.router.weight.t()).softmax(-1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).float() / 10
    assert torch.isfinite(loss) and torch.allclose(loss, 4 * (frac * probs.mean(0)).sum())
    loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        m.router.weight.zero_()  # uniform router probabilities: the balanced value 1, whatever f is
    m(x)
    assert torch.allclose(moe_aux_loss(m), torch.tensor(1.0))
    assert moe_aux_loss(nn.Linear(2, 2)).item() == 0.0


def test_disabled_gives_base_output_and_eval_is_deterministic():
    base = tiny_transformer()
    model = copy.deepcopy(base)
    inject_moe_lora(model, MoELoRAConfig(router_noise=5.0))
    randomize_b(model)
    assert torch.equal(run(model), run(model))  # eval mode: no router noise
    set_moe_enabled(model, False)
    assert torch.equal(run(model), run(base))
    set_moe_enabled(model, True)
    model.train()
    ys = [model(**tiny_inputs())[0] for _ in range(2)]
    assert not torch.equal(ys[0], ys[1])  # training with router noise does perturb routing
    counts = moe_expert_counts(model)
    assert set(counts) == set(moe_modules(model))
    assert all(sum(c) == 16 + 5 for c in counts.values())  # single blocks see text + image tokens


def test_state_dict_round_trip_and_refusals():
    model = tiny_transformer()
    cfg = MoELoRAConfig(blocks="both", num_blocks=1, rank=4)
    inject_moe_lora(model, cfg)
    randomize_b(model)
    sd = moe_state_dict(model)
    assert len(sd) == 3 * 4 and all("lora_" not in k for k in sd)
    assert sum(p.numel() for p in moe_parameters(model)) == sum(v.numel() for v in sd.values())
    other = tiny_transformer()
    inject_moe_lora(other, cfg)
    assert not torch.equal(run(other), run(model))
    load_moe_state_dict(other, sd)
    assert torch.equal(run(other), run(model))
    with pytest.raises(UserError, match="missing"):
        load_moe_state_dict(other, {k: v for k, v in sd.items() if "expert_A" not in k})
    bad = dict(sd)
    key = next(k for k in sd if k.endswith("expert_A"))
    bad[key] = torch.zeros(4, 8, sd[key].shape[-1])
    with pytest.raises(UserError, match="shape"):
        load_moe_state_dict(other, bad)


def test_remove_restores_plain_linears_and_refusals():
    base = tiny_transformer()
    model = copy.deepcopy(base)
    names = inject_moe_lora(model, MoELoRAConfig())
    randomize_b(model)
    with pytest.raises(UserError, match="already"):
        inject_moe_lora(model, MoELoRAConfig())
    assert remove_moe_lora(model) == names
    assert not moe_modules(model) and torch.equal(run(model), run(base))
    with pytest.raises(UserError, match="matches no module"):
        inject_moe_lora(model, MoELoRAConfig(target_regex=r"nothing\.here"))
    with pytest.raises(UserError, match="not an nn.Linear"):
        inject_moe_lora(model, MoELoRAConfig(target_regex=r"single_transformer_blocks\.0\.norm"))
    with pytest.raises(UserError, match="unknown MoE-LoRA config key"):
        MoELoRAConfig.from_dict({"num_experts": 2, "experts": 3})
    with pytest.raises(UserError, match="top_k"):
        MoELoRAConfig(num_experts=2, top_k=3)
    assert MoELoRAConfig.from_dict(MoELoRAConfig(rank=8).to_dict()) == MoELoRAConfig(rank=8)


def test_half_precision_base_keeps_fp32_adapter_weights():
    torch.manual_seed(0)
    base = nn.Linear(8, 12).to(torch.bfloat16)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    m = MoELoRALinear(base, rank=4, impl="dense")
    assert m.expert_A.dtype == m.router.weight.dtype == torch.float32  # optimizer updates are not lost to rounding
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(x))
    with torch.no_grad():
        m.expert_B.normal_()
    g = MoELoRALinear(base, rank=4, impl="grouped")
    g.load_state_dict(m.state_dict())
    assert torch.allclose(m(x).float(), g(x).float(), atol=0.05)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_checkpointing_gives_the_same_gradients(impl):
    grads = []
    for ckpt in (False, True):
        model = tiny_transformer().train()
        inject_moe_lora(model, MoELoRAConfig(blocks="both", num_blocks=1, impl=impl))
        randomize_b(model)
        if ckpt:
            model.enable_gradient_checkpointing()
        loss = model(**tiny_inputs())[0].square().mean() + 0.1 * moe_aux_loss(model)
        loss.backward()
        grads.append([p.grad.clone() for p in moe_parameters(model)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[1])


@pytest.mark.parametrize("bias", [True, False])
def test_merged_top1_inference_matches_the_formula_and_follows_weight_edits(bias):
    """CPU top-1 inference runs each token through its expert's merged weight (W + s B_e A_e); the merged copies
    are rebuilt whenever a weight changes in place."""
    torch.manual_seed(0)
    m = MoELoRALinear(nn.Linear(8, 12, bias=bias), num_experts=4, top_k=1, rank=3, alpha=6.0)
    x = torch.randn(2, 7, 8)
    assert not m._use_merged(x)                     # off unless an inference pipeline fuses its adapter
    m.merge_experts = True
    assert m._use_merged(x)
    with torch.no_grad():
        m.expert_B.normal_()
        assert torch.allclose(m(x), reference_output(m, x), atol=1e-5)
        expected = torch.bincount((x.reshape(-1, 8) @ m.router.weight.t()).argmax(-1), minlength=4)
        assert torch.equal(m.last_counts, expected) and (expected > 0).sum() > 1
        m.expert_B.mul_(2.0)
        m.base.weight.add_(0.5)
        assert torch.allclose(m(x), reference_output(m, x), atol=1e-5)
        m.router.weight.fill_(-1.0)
        m.router.weight[1] = 1.0                    # positive inputs: every token on expert 1 (no gather)
        xp = x.abs() + 0.1
        assert torch.allclose(m(xp), reference_output(m, xp), atol=1e-5)
        assert m.last_counts.tolist() == [0, 14, 0, 0]
    assert torch.allclose(m(xp), reference_output(m, xp), atol=1e-5)   # with autograd: the training path


def test_merged_experts_stay_off_where_their_copies_would_cost_memory():
    big = MoELoRALinear(nn.Linear(3072, 3072), num_experts=4, rank=4)    # 4 copies of 36 MB: over the budget
    half = MoELoRALinear(nn.Linear(8, 12).to(torch.bfloat16), rank=4)
    small = MoELoRALinear(nn.Linear(8, 12), rank=4)
    for m in (big, half, small):
        m.merge_experts = True
    assert not big._use_merged(torch.randn(3, 3072)) and not half._use_merged(torch.randn(3, 8, dtype=torch.bfloat16))
    assert small._use_merged(torch.randn(3, 8))


class PackedLinear(nn.Linear):
    """An nn.Linear subclass keeping its weight as uint8 codes, as bitsandbytes' Linear4bit does (packed NF4)."""

    def __init__(self, lin: nn.Linear):
        super().__init__(lin.in_features, lin.out_features)
        self.scale = float(lin.weight.detach().abs().max()) / 127
        codes = (lin.weight.detach() / self.scale).round().add(128).to(torch.uint8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, (self.weight.float() - 128) * self.scale, self.bias)


def test_a_quantised_linear_subclass_takes_moe_lora_with_fp32_experts_that_train():
    torch.manual_seed(0)
    model = nn.Sequential(PackedLinear(nn.Linear(8, 12)))
    x = torch.randn(5, 8)
    before = model(x)
    assert inject_moe_lora(model, MoELoRAConfig(target_regex="0", rank=3)) == ["0"]
    m = model[0]
    assert isinstance(m, MoELoRALinear) and isinstance(m.base, PackedLinear)
    assert {p.dtype for p in moe_parameters(model)} == {torch.float32}   # not the packed weight's uint8
    assert torch.equal(model(x), before)
    model(x).pow(2).sum().backward()
    assert m.expert_B.grad.abs().sum() > 0 and m.base.weight.grad is None
    m.merge_experts = True
    with torch.no_grad():
        assert not m._use_merged(x) and torch.equal(model(x), before)   # no merged copies of a packed weight
