"""The deterministic ToyWorld evaluator: its controls (ground truth, swapped and decoy references), bad input, and the toy reward."""

import copy

import numpy as np
import pytest
from PIL import Image

from multicrafter.rewards.base import RewardBatch
from multicrafter.rewards.toyworld_reward import ToyReward
from multicrafter.toyworld import build_sample, evaluate_batch, evaluate_image, render_scene
from multicrafter.toyworld.render import render_background


def _distinct_samples(seed: int, n: int):
    """Two-subject held-out scenes whose subjects differ in shape, pattern and both colours."""
    out, i = [], 0
    while len(out) < n:
        s = build_sample(seed, i, split="test", n_subjects=2, similar_prob=0.0)
        a, b = s.scene["subjects"]
        if a["shape"] != b["shape"] and a["pattern"] != b["pattern"] and not set(a["colours"]) & set(b["colours"]):
            out.append(s)
        i += 1
    return out


@pytest.fixture(scope="module")
def samples():
    # a mix of 1-4 subjects, half with a similar pair
    return [build_sample(5, i, split="test", n_subjects=(1, 2, 3, 4), similar_prob=0.5) for i in range(16)]


def test_ground_truth_scores_near_perfect(samples):
    res = evaluate_batch([s.image for s in samples], [s.references for s in samples], [s.scene for s in samples])
    assert res["n"] == 16
    assert res["id_sim"] >= 0.95 and res["leakage"] <= 0.05 and res["layout"] >= 0.95
    assert res["quality"] >= 0.95 and res["overall"] >= 0.95
    assert min(r["id_sim"] for r in res["per_image"]) >= 0.9
    assert res["acc_shape"] >= 0.95 and res["acc_colour"] >= 0.95 and res["acc_pattern"] >= 0.95
    # references as identity specs (rendered canonically) score the same way
    s = samples[0]
    spec_refs = [{k: x[k] for k in ("shape", "colours", "pattern")} for x in s.scene["subjects"]]
    assert evaluate_image(s.image, spec_refs, s.scene)["id_sim"] >= 0.95


def test_references_of_other_subjects_lower_id_sim_sharply(samples):
    others = [build_sample(6, i, split="test", n_subjects=len(s.references)) for i, s in enumerate(samples)]
    true = np.mean([evaluate_image(s.image, s.references, s.scene)["id_sim"] for s in samples])
    wrong = np.mean([evaluate_image(s.image, o.references, s.scene)["id_sim"] for s, o in zip(samples, others)])
    assert wrong < 0.4 < 0.95 < true


def test_attribute_swap_between_subjects_lowers_id_sim():
    for s in _distinct_samples(8, 4):
        scene = copy.deepcopy(s.scene)
        a, b = scene["subjects"]
        a["colours"], b["colours"] = b["colours"], a["colours"]
        swapped = render_scene(scene)[0]
        assert evaluate_image(swapped, s.references, s.scene)["id_sim"] < 0.75
        assert evaluate_image(s.image, s.references, s.scene)["id_sim"] > 0.95


def test_blended_attributes_score_high_leakage():
    for s in _distinct_samples(9, 4):
        scene = copy.deepcopy(s.scene)
        a, b = scene["subjects"]
        ta, tb = s.scene["subjects"]
        a["colours"], a["pattern"] = [ta["colours"][0], tb["colours"][0]], tb["pattern"]
        b["colours"], b["pattern"] = [tb["colours"][0], ta["colours"][0]], ta["pattern"]
        blended = evaluate_image(render_scene(scene)[0], s.references, s.scene)
        clean = evaluate_image(s.image, s.references, s.scene)
        assert clean["leakage"] <= 0.05 and blended["leakage"] >= 0.3
        assert blended["overall"] < clean["overall"]


def test_two_copies_of_one_subject_score_lower_than_both(samples):
    for s in [x for x in samples if len(x.references) == 2][:4] + _distinct_samples(10, 2):
        scene = copy.deepcopy(s.scene)
        first, second = scene["subjects"][:2]
        for key in ("id", "shape", "colours", "pattern"):
            second[key] = copy.deepcopy(first[key])
        copies = evaluate_image(render_scene(scene)[0], s.references, s.scene)
        true = evaluate_image(s.image, s.references, s.scene)
        assert copies["id_sim"] < true["id_sim"] - 0.05


def test_hungarian_score_invariant_to_reference_order(samples):
    for s in samples[:6]:
        base = evaluate_image(s.image, s.references)
        rev = evaluate_image(s.image, s.references[::-1])
        assert rev["id_sim"] == pytest.approx(base["id_sim"], abs=1e-9)
        assert sorted(rev["per_reference"]) == pytest.approx(sorted(base["per_reference"]), abs=1e-9)


def test_degraded_image_scores_between_truth_and_noise(samples):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    s = samples[1]
    blurred = ndimage.gaussian_filter(s.image.astype(np.float32), (1.0, 1.0, 0)) + rng.normal(0, 6, s.image.shape)
    blurred = np.clip(blurred, 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, s.image.shape, dtype=np.uint8)
    r_true, r_blur, r_noise = (evaluate_image(x, s.references, s.scene) for x in (s.image, blurred, noise))
    assert r_true["quality"] > r_blur["quality"] > r_noise["quality"]
    assert r_blur["id_sim"] > 0.6 and r_noise["id_sim"] < 0.4
    assert r_true["overall"] > r_blur["overall"] > r_noise["overall"]


def test_bad_input_gives_defined_scores_with_notes(tmp_path, samples):
    s = samples[1]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = evaluate_image(bad, s.references, s.scene)
    assert r["id_sim"] == 0.0 and r["overall"] == 0.0 and "unreadable" in r["notes"][0]
    r = evaluate_image(tmp_path / "missing.png", s.references, s.scene)
    assert r["id_sim"] == 0.0 and r["notes"]
    # wrong size: scored at its own size, with a note
    small = Image.fromarray(s.image).resize((96, 96), Image.NEAREST)
    r = evaluate_image(small, s.references, s.scene)
    assert any("96x96" in n for n in r["notes"]) and r["id_sim"] > 0.8
    # no subjects at all
    empty = render_background(128, 128, s.scene["background"]["colour"], s.scene["background"]["texture"])
    r = evaluate_image(empty, s.references, s.scene)
    assert r["id_sim"] == 0.0 and r["n_found"] == 0 and r["notes"]
    # one subject missing: its reference scores 0, the other keeps its score
    two = next(x for x in samples if len(x.references) == 2)
    scene = copy.deepcopy(two.scene)
    scene["subjects"] = scene["subjects"][:1]
    r = evaluate_image(render_scene(scene)[0], two.references, two.scene)
    assert r["per_reference"][1] == 0.0 and r["per_reference"][0] > 0.9 and r["id_sim"] < 0.55
    assert any("missing" in n for n in r["notes"])
    # unreadable reference, tiny image, no references, no scene
    r = evaluate_image(two.image, [bad, two.references[1]], two.scene)
    assert r["per_reference"][0] == 0.0 and r["per_reference"][1] > 0.9 and any("reference 0" in n for n in r["notes"])
    assert evaluate_image(np.zeros((4, 4, 3), np.uint8), s.references)["notes"]
    assert evaluate_image(s.image, [])["id_sim"] == 0.0
    r = evaluate_image(s.image, s.references)
    assert r["layout"] == 0.0 and r["id_sim"] > 0.9 and any("layout" in n for n in r["notes"])


def test_prompt_alone_gives_layout(samples):
    s = samples[2]
    r = evaluate_image(s.image, s.references, prompt=s.prompt)
    assert r["layout"] == 1.0
    flipped = np.ascontiguousarray(s.image[:, ::-1])
    if any(x["position"] in ("left", "right", "top left", "top right") for x in s.scene["subjects"]):
        assert evaluate_image(flipped, s.references, prompt=s.prompt)["layout"] < 1.0


def test_toy_reward_components(samples):
    s = samples[3]
    other = build_sample(6, 3, split="test", n_subjects=len(s.references))
    batch = RewardBatch(images=[Image.fromarray(s.image), Image.fromarray(s.image), "nonexistent.png"],
                        prompts=[s.prompt, s.prompt, s.prompt],
                        references=[[Image.fromarray(r) for r in s.references],
                                    [Image.fromarray(r) for r in other.references], s.references],
                        metadata=[{"toyworld": s.scene}, None, None])
    out = ToyReward()(batch)
    assert set(out.components) == {"text", "aes", "id"}
    assert all(len(v) == 3 for v in out.components.values())
    assert out.components["id"][0] > 0.95 and out.components["id"][1] < 0.5 and out.components["id"][2] == 0.0
    # text accuracy is judged against the prompt (parsed for sample 1), whatever the references
    assert out.components["text"][0] == 1.0 and out.components["text"][1] == 1.0
    assert out.components["aes"][0] > 0.95
    assert any(n.startswith("sample 2") for n in out.notes)


def test_decoy_keeps_each_relation_to_own_and_is_not_other():
    from multicrafter.toyworld import catalogue
    from multicrafter.toyworld.evaluate import decoy_identity

    rng = np.random.default_rng(0)
    pool = catalogue()
    for _ in range(300):
        own, other = (pool[int(i)] for i in rng.choice(len(pool), 2, replace=False))
        d = decoy_identity(own, other, rng)
        assert d != other and d.body != d.accent
        for attr in ("shape", "pattern"):
            same = getattr(other, attr) == getattr(own, attr)
            assert (getattr(d, attr) == getattr(own, attr)) == same
            if not same:
                assert getattr(d, attr) != getattr(other, attr)
        assert set(d.colours) & set(own.colours) == set(other.colours) & set(own.colours)
        assert not (set(d.colours) - set(own.colours)) & set(other.colours)
        # in a scene, a differing shape or pattern is also none of the other subjects' (enough values are left)
        third = pool[int(rng.integers(len(pool)))]
        d = decoy_identity(own, other, rng, scene=(own, other, third))
        for attr in ("shape", "pattern"):
            if getattr(other, attr) != getattr(own, attr):
                assert getattr(d, attr) not in {getattr(x, attr) for x in (own, other, third)}


def test_decoy_leakage_is_the_chance_level_and_blending_rises_above_it():
    """Clean renders: both ~0. Blended attributes: leakage far above its decoy level (the decoys did not blend)."""
    for s in _distinct_samples(9, 4):
        scene = copy.deepcopy(s.scene)
        a, b = scene["subjects"]
        ta, tb = s.scene["subjects"]
        a["colours"], a["pattern"] = [ta["colours"][0], tb["colours"][0]], tb["pattern"]
        b["colours"], b["pattern"] = [tb["colours"][0], ta["colours"][0]], ta["pattern"]
        blended = evaluate_image(render_scene(scene)[0], s.references, s.scene, decoys=True)
        clean = evaluate_image(s.image, s.references, s.scene, decoys=True)
        assert clean["leakage_decoy"] <= 0.05 and clean["leakage_real"] <= 0.05
        assert blended["leakage"] >= 0.3 and blended["leakage_real"] - blended["leakage_decoy"] >= 0.2
    no_scene = evaluate_image(s.image, s.references, decoys=True)
    assert no_scene["leakage_decoy"] is None and no_scene["leakage_real"] is None  # no identities to mirror
    assert clean["leakage"] == evaluate_image(s.image, s.references, s.scene)["leakage"]
    assert evaluate_image(s.image, s.references, s.scene)["leakage_decoy"] is None  # off unless asked (rewards)
