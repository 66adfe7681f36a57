"""UNO's released LoRA format -> our adapter: exact arithmetic, stock loading, refusals, UNO's reference rules."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import save_file

from multicrafter import MultiCrafterPipeline
from multicrafter.adapters import load_adapter, remove_adapter
from multicrafter.convert_uno import convert
from multicrafter.errors import UserError
from multicrafter.presets import build_tiny_components
from multicrafter.references import ReferenceOptions, encode_references, prepare_reference_images

DIM, MLP, RANK = 32, 128, 4  # the tiny preset: hidden 2 heads x 16, MLP ratio 4


def uno_checkpoint(rank=RANK, n_double=2, n_single=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def pair(prefix, fin, fout):
        sd[f"{prefix}.down.weight"] = torch.randn(rank, fin, generator=g) * 0.3
        sd[f"{prefix}.up.weight"] = torch.randn(fout, rank, generator=g) * 0.3

    for i in range(n_double):
        pair(f"double_blocks.{i}.processor.qkv_lora1", DIM, 3 * DIM)
        pair(f"double_blocks.{i}.processor.proj_lora1", DIM, DIM)
        pair(f"double_blocks.{i}.processor.qkv_lora2", DIM, 3 * DIM)
        pair(f"double_blocks.{i}.processor.proj_lora2", DIM, DIM)
    for i in range(n_single):
        pair(f"single_blocks.{i}.processor.qkv_lora", DIM, 3 * DIM)
        pair(f"single_blocks.{i}.processor.proj_lora", DIM + MLP, DIM)
    return sd


def uno_reference_hooks(transformer, sd):
    """UNO's arithmetic written directly: fused qkv(x) + up(down(x)), proj(x) + up(down(x)), as forward hooks."""
    handles = []

    def add(module, down, up, rows=None):
        def hook(mod, args, out):
            delta = F.linear(F.linear(args[0], down), up)
            return out + (delta[..., rows[0]:rows[1]] if rows else delta)
        handles.append(module.register_forward_hook(hook))

    for key in [k for k in sd if k.endswith("down.weight")]:
        prefix = key[: -len(".down.weight")]
        down, up = sd[key], sd[prefix + ".up.weight"]
        kind, i, _, name = prefix.split(".")
        i = int(i)
        if kind == "double_blocks":
            attn = transformer.transformer_blocks[i].attn
            fused = {"qkv_lora1": [attn.to_q, attn.to_k, attn.to_v],
                     "qkv_lora2": [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]}
            single = {"proj_lora1": attn.to_out[0], "proj_lora2": attn.to_add_out}
        else:
            block = transformer.single_transformer_blocks[i]
            fused = {"qkv_lora": [block.attn.to_q, block.attn.to_k, block.attn.to_v]}
            single = {"proj_lora": block.proj_out}
        if name in fused:
            for j, mod in enumerate(fused[name]):
                add(mod, down, up, (j * DIM, (j + 1) * DIM))
        else:
            add(single[name], down, up)
    return handles


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 24, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                guidance=torch.tensor([4.0]), img_ids=torch.rand(24, 3) * 8, txt_ids=torch.zeros(5, 3),
                return_dict=False)


@pytest.fixture()
def converted(tmp_path):
    sd = uno_checkpoint()
    save_file(sd, tmp_path / "dit_lora.safetensors")
    transformer = build_tiny_components()["transformer"]
    out = convert(tmp_path / "dit_lora.safetensors", tmp_path / "uno_adapter", transformer)
    return sd, out


def test_converted_adapter_equals_uno_arithmetic(converted):
    sd, out = converted
    transformer = build_tiny_components()["transformer"]
    kw = transformer_inputs()
    with torch.no_grad():
        base = transformer(**kw)[0]
        handles = uno_reference_hooks(transformer, sd)
        expected = transformer(**kw)[0]
        for h in handles:
            h.remove()
        cfg = load_adapter(transformer, out)
        ours = transformer(**kw)[0]
    assert (expected - base).abs().max() > 1e-2, "the LoRA must change the output for the test to mean anything"
    assert (ours - expected).abs().max() <= 1e-5
    assert cfg.lora_rank == RANK and cfg.lora_alpha == RANK and cfg.extra["reference_style"] == "uno"
    # Only the double blocks, or only the single blocks: each part is exact on its own.
    for part in ("double_blocks", "single_blocks"):
        remove_adapter(transformer)
        sub = {k: v for k, v in sd.items() if k.startswith(part)}
        handles = uno_reference_hooks(transformer, sub)
        with torch.no_grad():
            exp = transformer(**kw)[0]
        for h in handles:
            h.remove()
        d = out.parent / f"only_{part}"
        save_file(sub, out.parent / f"{part}.safetensors")
        convert(out.parent / f"{part}.safetensors", d, transformer)
        load_adapter(transformer, d)
        with torch.no_grad():
            assert (transformer(**kw)[0] - exp).abs().max() <= 1e-5


def test_stock_flux_pipeline_loads_converted_dir(converted):
    sd, out = converted
    components = build_tiny_components()
    stock = FluxPipeline(**components)
    stock.load_lora_weights(str(out))
    kw = transformer_inputs(1)
    with torch.no_grad():
        stock_out = stock.transformer(**kw)[0]
    ours = build_tiny_components()["transformer"]
    uno_reference_hooks(ours, sd)
    with torch.no_grad():
        expected = ours(**kw)[0]
    assert (stock_out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.update({"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(RANK, DIM + 1)}), "fit"),
    (lambda sd: sd.update({"double_blocks.0.processor.proj_lora1.up.weight": torch.randn(DIM, RANK + 2)}), "pair"),
    (lambda sd: sd.update({"double_blocks.0.processor.mystery.down.weight": torch.randn(RANK, DIM)}), "not a UNO"),
    (lambda sd: sd.update({"double_blocks.7.processor.proj_lora1.down.weight": torch.randn(RANK, DIM),
                           "double_blocks.7.processor.proj_lora1.up.weight": torch.randn(DIM, RANK)}), "no transformer"),
    (lambda sd: sd.pop("single_blocks.1.processor.proj_lora.up.weight"), "lacks"),
    (lambda sd: [sd.update({k: torch.randn(8, v.shape[1]) if k.endswith("down.weight") else torch.randn(v.shape[0], 8)})
                 for k, v in list(sd.items()) if k.startswith("single")], "mixed ranks"),
])
def test_bad_checkpoints_are_refused_with_one_line(tmp_path, mutate, message):
    sd = uno_checkpoint()
    mutate(sd)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=message) as e:
        convert(tmp_path / "bad.safetensors", tmp_path / "out", build_tiny_components()["transformer"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, run_main):
    from multicrafter.convert_uno import main

    save_file(uno_checkpoint(), tmp_path / "dit_lora.safetensors")
    ok = run_main(main, ["--in", tmp_path / "dit_lora.safetensors", "--out", tmp_path / "a", "--base", "tiny"])
    assert ok.code == 0, ok.err
    assert (tmp_path / "a" / "pytorch_lora_weights.safetensors").exists()
    # A tiny-sized UNO file does not fit FLUX.1-dev (the default base): refused before writing.
    wrong = run_main(main, ["--in", tmp_path / "dit_lora.safetensors", "--out", tmp_path / "c"])
    assert wrong.code != 0 and "do not fit" in wrong.err and not (tmp_path / "c").exists()
    # The command line end to end: a bad file is one line on stderr, no traceback, a non-zero exit.
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    bad = subprocess.run([sys.executable, "-m", "multicrafter.convert_uno", "--in", str(tmp_path / "junk.safetensors"),
                          "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "cannot read" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "b").exists()


def uno_size(w, h, long_side):
    """UNO's rule by hand: long side scaled to `long_side` with int() truncation, then centre-cropped to x16."""
    if w >= h:
        nw, nh = long_side, int(long_side / w * h)
    else:
        nw, nh = int(long_side / h * w), long_side
    return nw // 16 * 16, nh // 16 * 16


@pytest.mark.parametrize("sizes", [[(600, 400)], [(600, 400), (300, 500)], [(640, 480), (333, 777), (500, 500)]])
def test_uno_reference_sizes_and_position_ids(sizes):
    opts = ReferenceOptions(style="uno")
    images = [Image.new("RGB", s, (i * 60, 100, 50)) for i, s in enumerate(sizes)]
    prepared = prepare_reference_images(images, opts)
    long_side = 512 if len(sizes) == 1 else 320
    assert [im.size for im in prepared] == [uno_size(w, h, long_side) for w, h in sizes]
    # UNO's ids for a 512x512 target (32x32 packed): reference k at (32 + sum h_prev, 32 + sum w_prev).
    vae = build_tiny_components()["vae"]
    packed = encode_references(vae, prepared, (32, 32), 1, "cpu", torch.float32)
    off_h = off_w = 32
    rows = []
    for im in prepared:
        gh, gw = im.height // 16, im.width // 16
        rows += [[0, off_h + y, off_w + x] for y in range(gh) for x in range(gw)]
        off_h, off_w = off_h + gh, off_w + gw
    assert torch.equal(packed.ids, torch.tensor(rows, dtype=torch.float32))


def test_pipeline_takes_uno_adapter_style_and_defaults(converted):
    _, out = converted
    pipe = MultiCrafterPipeline.from_pretrained("tiny", adapter=str(out))
    assert pipe.reference_options.style == "uno"
    assert pipe.sampling_defaults["num_inference_steps"] == 25 and pipe.sampling_defaults["guidance_scale"] == 4.0
    seen = []
    pipe("a", reference_images=[Image.new("RGB", (40, 30))], height=32, width=32, max_sequence_length=8,
         callback_on_step_end=lambda p, i, t, kw: seen.append(i) or {})
    assert len(seen) == 25


def test_conversion_sees_through_a_loaded_moe_adapter(tmp_path):
    """A base that carries an adapter (the toy model's default) still exposes its plain linears' shapes."""
    from multicrafter.adapters import AdapterConfig, add_adapter
    from multicrafter.moe_lora import MoELoRAConfig

    base = build_tiny_components()["transformer"]
    add_adapter(base, AdapterConfig(lora_rank=2, lora_alpha=2.0, moe=MoELoRAConfig(rank=2, alpha=2.0, num_blocks=2)))
    save_file(uno_checkpoint(), tmp_path / "dit_lora.safetensors")
    out = convert(tmp_path / "dit_lora.safetensors", tmp_path / "converted", base)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
