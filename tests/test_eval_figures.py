"""`python -m multicrafter.eval figures`: the contact sheet is built from eval's saved images, the attention figure
runs the real pipeline with two adapters, and missing inputs are one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter.errors import UserError
from multicrafter.eval.figures import attention_share, attention_stats_plot, main, near_share
from multicrafter.eval.toyworld_scores import main as eval_toy_main


def test_sheet_from_saved_eval_images(tmp_path):
    for name in ("a", "b"):
        assert eval_toy_main(["--model", "ground-truth", "--n", "2", "--save-images", str(tmp_path / name)]) == 0
    out = tmp_path / "sheet.png"
    assert main(["--images", str(tmp_path), "--adapters", "a,b", "--scenes", "2", "--sheet", str(out)]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape[1] == 64 + 4 + 128 + 2 * (4 + 128)   # refs | ground truth | a | b
    # the ground-truth column and adapter a's column show the same image (a was evaluated on ground truth)
    body = sheet[14:14 + 128]
    assert np.array_equal(body[:, 68:196], body[:, 200:328])
    with pytest.raises(UserError, match="no image folder"):
        main(["--images", str(tmp_path), "--adapters", "a,zzz", "--sheet", str(out)])
    with pytest.raises(UserError, match="missing"):
        main(["--images", str(tmp_path), "--adapters", "a", "--scenes", "3", "--sheet", str(out)])
    with pytest.raises(UserError, match="nothing to do"):
        main(["--images", str(tmp_path)])


def test_near_share_is_the_ring_around_the_subject_minus_other_subjects():
    """On a 4x4 map of an 8x8 image: the subject covers cell (1, 1); the ring is its 8 neighbours, one of which the
    other subject covers; mass placed on each kind of cell lands in the right share."""
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True                     # cell (1, 1)
    rest = np.zeros((8, 8), bool)
    rest[0:2, 0:2] = True                     # cell (0, 0): a ring cell another subject covers
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1], amap[0, 0], amap[2, 2], amap[3, 3] = 4, 1, 2, 3   # own, other, ring, far
    assert near_share(amap, mask, rest) == pytest.approx(2 / 10)
    assert attention_share(amap, mask) == pytest.approx(4 / 10)
    assert near_share(np.zeros((4, 4), np.float32), mask, rest) == 0.0


def test_attention_share():
    amap = np.zeros((4, 4), np.float32)
    amap[0, 0] = 3.0
    amap[3, 3] = 1.0
    mask = np.zeros((16, 16), bool)
    mask[:4, :4] = True
    assert attention_share(amap, mask) == pytest.approx(0.75)


def test_attention_figure_on_tiny_with_two_adapters(tmp_path, capsys):
    from multicrafter import MultiCrafterPipeline
    from multicrafter.adapters import AdapterConfig, add_adapter, remove_adapter, save_adapter

    t = MultiCrafterPipeline.from_pretrained("tiny").transformer
    folders = []
    for name, fill in (("one", 0.0), ("two", 0.05)):
        add_adapter(t, AdapterConfig(lora_rank=2, lora_alpha=2.0))
        with torch.no_grad():
            for n, p in t.named_parameters():
                if "lora_B" in n:
                    p.fill_(fill)
        folders.append(str(save_adapter(t, tmp_path / name)))
        remove_adapter(t)
    out, stats = tmp_path / "attn.png", tmp_path / "stats.json"
    assert main(["--model", "tiny", "--attention", str(out), "--attention-adapters", ",".join(folders),
                 "--size", "64", "--ref-size", "32", "--steps", "1", "--similar-prob", "1.0",
                 "--attention-stats", "2", "--json", str(stats)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("attention inside own region") == 2
    assert Image.open(out).size[0] > 400
    got = json.loads(stats.read_text())
    assert list(got) == folders
    for v in got.values():
        assert v["scenes"] == 2 and v["maps"] >= 4
        assert 0.0 < v["own"] < 1.0 and 0.0 < v["other"] < 1.0 and v["own"] + v["other"] <= 1.0 + 1e-6
    assert got[folders[0]] != got[folders[1]]  # the two adapters attend differently



def test_attention_stats_per_block_with_single_blocks_and_img2ref(tmp_path, capsys):
    from multicrafter import MultiCrafterPipeline

    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    n_double, n_single = len(pipe.transformer.transformer_blocks), len(pipe.transformer.single_transformer_blocks)
    stats = tmp_path / "stats.json"
    assert main(["--model", "tiny", "--attention-adapters", "none", "--size", "64", "--ref-size", "32",
                 "--steps", "1", "--attention-stats", "2", "--attention-mode", "img2ref", "--single-blocks",
                 "--json", str(stats), "--stats-plot", str(tmp_path / "blocks.png")]) == 0
    got = json.loads(stats.read_text())["none"]
    assert Image.open(tmp_path / "blocks.png").size[0] > 400
    expected = [f"double {i}" for i in range(n_double)] + [f"single {i}" for i in range(n_single)]
    assert got["mode"] == "img2ref" and list(got["blocks"]) == expected
    for b in got["blocks"].values():
        assert 0.0 <= b["own"] <= 1.0 and 0.0 <= b["other"] <= 1.0 and b["own"] + b["other"] <= 1.0 + 1e-6
        assert 0.0 <= b["near"] and b["own"] + b["other"] + b["near"] <= 1.0 + 1e-6
    # the overall map is the mean of the blocks' maps (each peak-normalised), so its shares lie within theirs
    owns = [b["own"] for b in got["blocks"].values()]
    assert min(owns) - 1e-6 <= got["own"] <= max(owns) + 1e-6
    assert "| none | single 0 |" in capsys.readouterr().out
    with pytest.raises(UserError, match="no per-block"):
        attention_stats_plot({"a": {"blocks": {}}})


def test_attention_stats_of_one_head(tmp_path):
    """--attention-heads: the maps of the chosen heads alone (other shares than the mean over all heads), recorded
    in the JSON; a head the model lacks is one line from the pipeline."""
    from multicrafter import MultiCrafterPipeline

    common = ["--model", "tiny", "--attention-adapters", "none", "--size", "64", "--ref-size", "32", "--steps", "1",
              "--attention-stats", "2", "--attention-mode", "img2ref"]
    got = {}
    for name, extra in (("all", []), ("head1", ["--attention-heads", "1"])):
        assert main([*common, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())["none"]
    assert got["all"]["heads"] is None and got["head1"]["heads"] == [1]
    assert got["all"]["blocks"]["double 0"]["own"] != pytest.approx(got["head1"]["blocks"]["double 0"]["own"])
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    n = pipe.transformer.config.num_attention_heads
    ref = Image.new("RGB", (32, 32), "red")
    with pytest.raises(UserError, match="attention_heads"):
        pipe("a red circle", [ref], height=64, width=64, num_inference_steps=1, return_attention=True,
             attention_heads=[n])
