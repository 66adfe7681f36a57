"""Attention capture: unchanged block outputs, exact maps, gradients (with/without checkpointing), no L x L tensor."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from multicrafter.attention import (
    AttentionCapture,
    CaptureAttnProcessor,
    CaptureLayout,
    install_capture,
    normalize_maps,
    remove_capture,
)
from multicrafter.losses import dice_loss
from multicrafter.presets import build_tiny_components

N_TEXT, GRID, REF_GRIDS = 6, (4, 4), [(3, 3), (2, 4)]


@pytest.fixture()
def transformer():
    return build_tiny_components()["transformer"].float()


def make_inputs(batch=2, n_text=N_TEXT, grid=GRID, ref_grids=REF_GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_t = grid[0] * grid[1]
    lengths = [h * w for h, w in ref_grids]
    ids = [torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)]
    off = list(grid)
    for h, w in ref_grids:
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        ids.append(yx + torch.tensor(off))
        off = [off[0] + h, off[1] + w]
    img_ids = torch.cat([torch.zeros(n_t + sum(lengths), 1), torch.cat(ids).float()], 1)
    kw = dict(
        hidden_states=torch.randn(batch, n_t + sum(lengths), 64, generator=g),
        encoder_hidden_states=torch.randn(batch, n_text, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.6), guidance=torch.full((batch,), 3.5),
        img_ids=img_ids, txt_ids=torch.zeros(n_text, 3), return_dict=False,
    )
    return kw, CaptureLayout(n_text, n_t, lengths)


def block_outputs(transformer, kw):
    """Outputs of every block (double, then single), recorded with forward hooks."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(tuple(t.clone() for t in o)))
             for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]]
    final = transformer(**kw)[0]
    for h in hooks:
        h.remove()
    return outs, final


@pytest.mark.parametrize("mode", ["ref2img", "img2ref"])
def test_block_outputs_unchanged_and_map_shapes(transformer, mode):
    kw, layout = make_inputs()
    stock_blocks, stock_final = block_outputs(transformer, kw)
    cap = AttentionCapture(mode=mode, layout=layout)
    install_capture(transformer, cap)
    ours_blocks, ours_final = block_outputs(transformer, kw)
    for (a1, b1), (a2, b2) in zip(stock_blocks, ours_blocks):
        assert (a1 - a2).abs().max() <= 1e-5 and (b1 - b2).abs().max() <= 1e-5
    assert (stock_final - ours_final).abs().max() <= 1e-5
    assert sorted(cap.maps) == [0, 1]
    assert cap.aggregate().shape == (2, 2, 16)
    remove_capture(transformer)
    assert all(type(b.attn.processor) is FluxAttnProcessor for b in transformer.transformer_blocks)


@pytest.mark.parametrize("mode", ["ref2img", "img2ref"])
def test_single_blocks_capture_exact_maps_without_changing_outputs(transformer, mode):
    kw, layout = make_inputs()
    stock_blocks, stock_final = block_outputs(transformer, kw)
    cap = AttentionCapture(mode=mode, layout=layout, head_chunk=1)
    n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    keys = install_capture(transformer, cap, blocks=[], single_blocks=[-1])
    assert keys == [n_double + n_single - 1]
    proc = transformer.single_transformer_blocks[-1].attn.processor
    seen, original = {}, proc._record

    def spy(q, k):
        seen["qk"] = (q.detach(), k.detach())
        original(q, k)

    proc._record = spy
    ours_blocks, ours_final = block_outputs(transformer, kw)
    for a, b in zip(stock_blocks, ours_blocks):
        assert all((x - y).abs().max() <= 1e-5 for x, y in zip(a, b))
    assert (stock_final - ours_final).abs().max() <= 1e-5
    assert list(cap.maps) == keys  # the double blocks kept the stock processor
    assert torch.allclose(cap.maps[keys[0]], brute_force(*seen["qk"], layout, mode), atol=1e-6)
    remove_capture(transformer)
    assert all(type(b.attn.processor) is FluxAttnProcessor
               for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks])


@pytest.mark.parametrize("mode", ["ref2img", "img2ref"])
def test_head_subset_maps_are_the_chosen_heads_only(transformer, mode):
    """AttentionCapture.heads: maps averaged over the chosen heads alone; the block outputs stay stock."""
    kw, layout = make_inputs()
    stock_blocks, stock_final = block_outputs(transformer, kw)
    cap = AttentionCapture(mode=mode, layout=layout, head_chunk=1, heads=[1])
    install_capture(transformer, cap, blocks=[0])
    proc = transformer.transformer_blocks[0].attn.processor
    seen, original = {}, proc._record

    def spy(q, k):
        seen["qk"] = (q.detach(), k.detach())
        original(q, k)

    proc._record = spy
    ours_blocks, ours_final = block_outputs(transformer, kw)
    assert (stock_final - ours_final).abs().max() <= 1e-5
    q, k = seen["qk"]
    assert q.shape[2] > 1  # the tiny model has several heads, so a subset differs from all of them
    one = brute_force(q[:, :, 1:2], k[:, :, 1:2], layout, mode)
    assert torch.allclose(cap.maps[0], one, atol=1e-6)
    assert not torch.allclose(cap.maps[0], brute_force(q, k, layout, mode), atol=1e-4)
    remove_capture(transformer)


def brute_force(q, k, layout, mode):
    """The paper's definition with the full L x L attention matrix (test only)."""
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5, -1).mean(1)  # (B, L, L)
    t0, t1 = layout.n_text, layout.n_text + layout.n_target
    out, start = [], t1
    for length in layout.ref_lengths:
        if mode == "ref2img":
            out.append(probs[:, start:start + length, t0:t1].mean(1))
        else:
            out.append(probs[:, t0:t1, start:start + length].sum(-1))
        start += length
    return torch.stack(out, 1)


@pytest.mark.parametrize("mode", ["ref2img", "img2ref"])
def test_maps_equal_the_definition(transformer, mode):
    kw, layout = make_inputs()
    seen = {}
    cap = AttentionCapture(mode=mode, layout=layout, head_chunk=1)
    install_capture(transformer, cap, blocks=[1])
    proc = transformer.transformer_blocks[1].attn.processor
    original = proc._record

    def spy(q, k):
        seen["qk"] = (q.detach(), k.detach())
        original(q, k)

    proc._record = spy
    transformer(**kw)
    assert list(cap.maps) == [1]
    expected = brute_force(*seen["qk"], layout, mode)
    assert torch.allclose(cap.maps[1], expected, atol=1e-6)


def test_no_l_by_l_tensor_in_capture_path(transformer):
    """Record every tensor shape produced while the capture processor runs; none may be L x L."""
    kw, layout = make_inputs(batch=1, n_text=7, grid=(8, 8), ref_grids=[(6, 6), (6, 6)])
    L = 7 + 64 + 72

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
            return out

    for mode in ("ref2img", "img2ref"):
        cap = AttentionCapture(mode=mode, layout=layout)
        install_capture(transformer, cap)
        proc = transformer.transformer_blocks[0].attn.processor
        assert isinstance(proc, CaptureAttnProcessor)
        rec = Shapes()

        def recorded(*a, _proc=proc, _rec=rec, **k):
            with _rec:
                return _proc(*a, **k)

        transformer.transformer_blocks[0].attn.processor = _Callable(recorded)
        transformer(**kw)
        assert rec.shapes, "nothing recorded"
        assert any(L in s for s in rec.shapes), "the recorder did not see the joint sequence"
        assert not [s for s in rec.shapes if s.count(L) >= 2], f"L x L tensor formed in {mode}"
        remove_capture(transformer)


class _Callable:
    """Stand-in processor object delegating to a function (lets the test wrap a processor call)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *a, **k):
        return self.fn(*a, **k)


def _dice_grads(transformer, checkpointing, recompute=False):
    kw, layout = make_inputs()
    transformer.zero_grad(set_to_none=True)
    transformer.requires_grad_(True)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    cap = AttentionCapture(layout=layout, recompute=recompute)
    install_capture(transformer, cap)
    transformer.train()
    out = transformer(**kw)[0]
    maps = normalize_maps(cap.aggregate())
    masks = torch.zeros_like(maps)
    masks[:, 0, :8] = 1
    masks[:, 1, 8:] = 1
    loss = dice_loss(maps, masks) + out.pow(2).mean()
    loss.backward()
    remove_capture(transformer)
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_dice_gradient_reaches_queries_and_keys(transformer):
    grads = _dice_grads(transformer, checkpointing=False)
    for i in range(2):
        for proj in ("to_q", "to_k"):
            g = grads[f"transformer_blocks.{i}.attn.{proj}.weight"]
            assert g.abs().sum() > 0


def test_gradients_equal_with_and_without_checkpointing(transformer):
    plain = _dice_grads(transformer, checkpointing=False)
    ckpt = _dice_grads(transformer, checkpointing=True)
    recompute = _dice_grads(transformer, checkpointing=True, recompute=True)
    assert plain.keys() == ckpt.keys() == recompute.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
        assert torch.allclose(plain[name], recompute[name], atol=1e-6, rtol=1e-5), name


def test_inference_accumulators_are_bounded(transformer):
    kw, layout = make_inputs()
    cap = AttentionCapture(layout=layout)
    install_capture(transformer, cap)
    with torch.no_grad():
        for _ in range(3):
            transformer(**kw)
            cap.end_step()
    assert len(cap.per_step) == 3 and cap.per_step[0].shape == (2, 2, 16)
    assert sorted(cap.per_block()) == [0, 1] and not cap.maps
