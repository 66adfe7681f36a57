"""MultiCrafterPipeline: stock equivalence, reference packing and position ids, output shapes, determinism."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.errors import UserError
from multicrafter.references import (
    ReferenceOptions,
    encode_references,
    prepare_reference_images,
    reference_position_ids,
    reference_size,
)


@pytest.fixture(scope="module")
def pipe():
    return MultiCrafterPipeline.from_pretrained("tiny")


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_no_references_equals_stock_flux(pipe):
    kw = dict(height=64, width=48, num_inference_steps=3, max_sequence_length=16, output_type="np")
    ours = pipe("a red circle", generator=_gen(), **kw).images
    stock = FluxPipeline(**pipe.components)("a red circle", generator=_gen(), **kw).images
    assert ours.shape == (1, 64, 48, 3)
    assert np.abs(ours - stock).max() <= 1e-5


def test_stock_arguments_pass_through(pipe):
    """true CFG with a negative prompt, latents output and sigmas are stock FluxPipeline arguments."""
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="latent",
              negative_prompt="blurry", true_cfg_scale=2.0)
    ours = pipe("a dog", generator=_gen(1), **kw).images
    stock = FluxPipeline(**pipe.components)("a dog", generator=_gen(1), **kw).images
    assert torch.allclose(ours, stock, atol=1e-6)


def test_reference_sizes_follow_the_rule():
    opts = ReferenceOptions()
    assert reference_size(1000, 500, 512) == (512, 256)
    assert reference_size(300, 600, 320) == (160, 320)
    assert reference_size(333, 777, 320) == (128, 320)  # 137.1 -> 137 -> rounded down to 128
    one = prepare_reference_images([_img(100, 50)], opts)
    two = prepare_reference_images([_img(100, 50), _img(40, 80)], opts)
    assert one[0].size == (512, 256)
    assert [im.size for im in two] == [(320, 160), (160, 320)]


@pytest.mark.parametrize("sizes", [[(64, 64)], [(64, 48), (32, 64)], [(48, 48), (64, 32), (32, 32), (16, 48)]])
def test_token_counts_and_position_ids(pipe, sizes):
    images = [_img(w, h, i) for i, (w, h) in enumerate(sizes)]
    packed = encode_references(pipe.vae, images, (4, 5), 2, "cpu", torch.float32)
    # VAE x8 then 2x2 packing: a (w, h) image gives (h/16) x (w/16) tokens.
    expected = [(h // 16) * (w // 16) for w, h in sizes]
    assert packed.lengths == expected
    assert packed.latents.shape == (2, sum(expected), 64)
    # Hand-computed UnoPE: reference k starts at (H_t + sum of earlier h, W_t + sum of earlier w).
    rows = []
    off_h, off_w = 4, 5
    for w, h in sizes:
        gh, gw = h // 16, w // 16
        for y in range(gh):
            for x in range(gw):
                rows.append([0, off_h + y, off_w + x])
        off_h, off_w = off_h + gh, off_w + gw
    assert torch.equal(packed.ids, torch.tensor(rows, dtype=torch.float32))
    assert torch.equal(reference_position_ids((4, 5), packed.grids), packed.ids)


@pytest.mark.parametrize("n_refs", [1, 2, 4])
def test_generation_with_references(pipe, n_refs):
    refs = [_img(40 + 8 * i, 56, i) for i in range(n_refs)]
    out = pipe("two subjects", reference_images=refs, height=48, width=64, num_inference_steps=2,
               max_sequence_length=16, generator=_gen(), return_attention=True)
    assert out.images[0].size == (64, 48)
    assert out.attention_maps.shape == (n_refs, 3, 4)
    assert out.attention_per_step.shape == (2, n_refs, 3, 4)
    assert torch.allclose(out.attention_maps.flatten(1).amax(1), torch.ones(n_refs))
    # Same seed, same result; references change the result.
    again = pipe("two subjects", reference_images=refs, height=48, width=64, num_inference_steps=2,
                 max_sequence_length=16, generator=_gen(), output_type="np").images
    assert np.array_equal(np.asarray(out.images[0]), (again[0] * 255).round().astype(np.uint8))
    plain = pipe("two subjects", height=48, width=64, num_inference_steps=2, max_sequence_length=16,
                 generator=_gen(), output_type="np").images
    assert np.abs(plain - again).max() > 1e-3


def test_inputs_accepted_in_every_form(pipe, tmp_path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 128))
    grey = Image.new("L", (32, 32), 100)
    path = tmp_path / "r.png"
    _img(32, 32).save(path)
    arr = np.asarray(_img(32, 32, 3))
    refs = prepare_reference_images([rgba, grey, str(path), arr])
    assert all(r.mode == "RGB" for r in refs)


def test_bad_inputs_raise_user_errors(pipe, tmp_path):
    with pytest.raises(UserError, match="at most 4"):
        pipe("x", reference_images=[_img(32, 32)] * 5, height=32, width=32, num_inference_steps=1)
    with pytest.raises(UserError, match="multiples of 16"):
        pipe("x", height=40, width=32, num_inference_steps=1)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="not a valid image"):
        pipe("x", reference_images=[str(bad)], height=32, width=32, num_inference_steps=1)


def test_unknown_models_fail_with_one_line():
    with pytest.raises(UserError, match="unavailable") as e:
        MultiCrafterPipeline.from_pretrained("nobody/no-such-model")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown model"):
        MultiCrafterPipeline.from_pretrained("not a model")


def test_local_diffusers_folder_round_trip(pipe, tmp_path):
    """A FLUX-layout folder (as save_pretrained writes it) loads through the real loading path, same outputs."""
    pipe.save_pretrained(tmp_path / "model")
    loaded = MultiCrafterPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    a = pipe("a dog", generator=_gen(2), **kw).images
    b = loaded("a dog", generator=_gen(2), **kw).images
    assert np.abs(a - b).max() <= 1e-6
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        MultiCrafterPipeline.from_pretrained(str(tmp_path / "empty"))
