"""train.pretrain on the tiny model: both modes end to end, λ = 0 is plain flow matching, the Dice loss trains the
attention, resume is exact, bad configs stop with one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from multicrafter import MultiCrafterPipeline
from multicrafter.attention import CaptureAttnProcessor
from multicrafter.errors import UserError
from multicrafter.losses import noisy_latents, sample_sigmas
from multicrafter.references import predict_velocity
from train.checkpoints import load_checkpoint
from train.config import load_config
from train.metrics_log import read_metrics
from train.pretrain import PretrainConfig, Trainer, main

REPO = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((REPO / "train/configs/tiny_pretrain.yaml").read_text())
LOSS_KEYS = ("loss", "loss_diff", "loss_attn", "lr", "grad_norm")


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[leaf] = value


def write_cfg(folder: Path, world: Path | None, **overrides) -> Path:
    """tiny_pretrain.yaml with dotted overrides (a__b == a.b) and the shared ToyWorld folder."""
    cfg = copy.deepcopy(BASE)
    cfg["output"]["progress"] = False
    cfg["train"]["max_steps"] = 3
    if world is not None:
        cfg["data"]["toyworld"].update(n=4, folder=str(world))
    for key, value in overrides.items():
        _set(cfg, key.replace("__", "."), value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world") / "toyworld"


def _trainer(tmp_path: Path, world: Path, **overrides) -> Trainer:
    cfg = load_config(write_cfg(tmp_path / "cfg", world, **overrides), PretrainConfig)
    return Trainer(cfg, tmp_path / "out")


def _gen(pipe, **kw):
    return pipe(prompt="a red circle on the left", reference_images=kw.pop("refs"), height=64, width=64,
                num_inference_steps=2, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


@pytest.mark.parametrize("adapter_type", ["lora", "moe_lora"])
def test_adapter_run_writes_metrics_and_loadable_adapter(tmp_path, world, adapter_type):
    out = tmp_path / "run"
    assert main(["--config", str(write_cfg(tmp_path, world, adapter__type=adapter_type)), "--output-dir",
                 str(out)]) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert all(np.isfinite(r[k]) for k in LOSS_KEYS) and r["sec_per_step"] > 0
        assert r["loss"] == pytest.approx(r["loss_diff"] + 0.5 * r["loss_attn"] + 0.01 * r.get("moe_aux", 0.0),
                                          rel=1e-5)
        assert r["loss_attn"] > 0
    assert ("moe_aux" in recs[0]) == (adapter_type == "moe_lora")
    assert list((out / "samples" / "step-000003").glob("*_attention.png"))

    # The saved adapter is exactly the trained weights, and it loads into the pipeline and changes its output.
    trained = load_checkpoint(out / "checkpoint-3")["trainable"]
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    pipe.load_adapter(out / "adapter")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if n in trained}
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[n].float(), trained[n]) for n in trained)
    assert any(("lora_B" in n or "expert_B" in n) and trained[n].abs().sum() > 0 for n in trained)
    refs = sorted((world / "refs").glob("*.png"))[:2]
    with_adapter = _gen(pipe, refs=refs, return_attention=True)
    without = _gen(pipe, refs=refs, use_adapter=False)
    assert with_adapter.shape == (1, 64, 64, 3) and not np.array_equal(with_adapter, without)


def test_base_run_saves_a_loadable_pipeline(tmp_path, world):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, world, train__mode="base", attention_loss__weight=0.0, data__with_references=False,
                    optim__lr=1e-3)
    assert main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss_attn"] == 0.0 for r in recs)
    pipe = MultiCrafterPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.reference_options.long_side_multi == 48          # the trained reference sizes travel with it
    fresh = MultiCrafterPipeline.from_pretrained("tiny")
    name, w = next((n, p) for n, p in pipe.transformer.named_parameters() if n.endswith("proj_out.weight"))
    assert not torch.equal(w, dict(fresh.transformer.named_parameters())[name])   # full weights were trained
    assert not any(isinstance(b.attn.processor, CaptureAttnProcessor) for b in pipe.transformer.transformer_blocks)
    assert _gen(pipe, refs=[]).shape == (1, 64, 64, 3)


def test_base_run_from_a_new_vae_and_fresh_transformer(tmp_path, world):
    """The recipe/base.yaml path: tiny text side + a separately trained x4 VAE + a fresh transformer, with references
    and the Dice loss from the start."""
    from diffusers import AutoencoderKL

    from multicrafter.presets import TINY_VAE

    vae_cfg = {**TINY_VAE, "block_out_channels": (8, 16, 16), "down_block_types": ("DownEncoderBlock2D",) * 3,
               "up_block_types": ("UpDecoderBlock2D",) * 3}
    AutoencoderKL(**vae_cfg).save_pretrained(tmp_path / "vae")
    spec = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
            "axes_dims_rope": [4, 6, 6]}
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, world, train__mode="base", model__vae=str(tmp_path / "vae"),
                    model__init_transformer=spec, attention_loss__weight=0.5)
    assert main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    assert all(r["loss_attn"] > 0 for r in read_metrics(out))
    pipe = MultiCrafterPipeline.from_pretrained(str(out / "pipeline"))
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.num_layers == 1
    # trained from scratch at one guidance embedding: the saved model says so, and generation uses it by default
    assert pipe.sampling_defaults["guidance_scale"] == 1.0 and pipe.sampling_defaults["height"] == 64
    maps = pipe(prompt="a red circle", reference_images=sorted((world / "refs").glob("*.png"))[:2], height=64,
                width=64, num_inference_steps=2, max_sequence_length=16, return_attention=True).attention_maps
    assert maps.shape == (2, 8, 8)                                  # x4 VAE: 64 px -> 8x8 packed grid


def test_lambda_zero_is_plain_flow_matching(tmp_path, world):
    t = _trainer(tmp_path / "a", world, attention_loss__weight=0.0, data__caption_dropout=0.0, adapter__type="lora")
    assert t.capture is None
    assert not any(isinstance(b.attn.processor, CaptureAttnProcessor) for b in t.transformer.transformer_blocks)
    # Recompute the first step's loss independently: same batch, same draws, mean((v_pred - (noise - x0))^2).
    gen = torch.Generator()
    gen.set_state(t.noise_gen.get_state())
    batch = t.data.collate(copy.deepcopy(t.order).next(), t.pipe, "cpu", t.dtype, gen)
    x0 = batch["latents"]
    sigmas = sample_sigmas(x0.shape[0], t.cfg.train.timesteps, gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t, _ = noisy_latents(x0, noise, sigmas)
    gh, gw = batch["grid"]
    ids = MultiCrafterPipeline._prepare_latent_image_ids(1, gh, gw, "cpu", x0.dtype)
    with torch.no_grad():
        pred = predict_velocity(t.transformer, x_t, ids, sigmas, batch["prompt_embeds"], batch["pooled"],
                                torch.zeros(batch["prompt_embeds"].shape[1], 3), refs=batch["refs"],
                                guidance=torch.ones(1))
    expected = ((pred.float() - (noise - x0)) ** 2).mean().item()
    recs = [t.train_step() for _ in range(3)]
    assert recs[0]["loss"] == expected
    assert all(r["loss"] == r["loss_diff"] and r["loss_attn"] == 0.0 for r in recs)
    # With λ > 0 the capture processor is installed, yet the first forward (same weights) gives the same L_diff.
    t2 = _trainer(tmp_path / "b", world, attention_loss__weight=1.0, data__caption_dropout=0.0, adapter__type="lora")
    assert t2.capture is not None
    r2 = t2.train_step()
    assert r2["loss_diff"] == recs[0]["loss_diff"] and r2["loss_attn"] > 0 and r2["loss"] > r2["loss_diff"]


def test_dice_only_below_max_sigma(tmp_path, world):
    """attention_loss.max_sigma: samples noised above it take no Dice loss; at 1 every sample does (the default)."""
    kw = dict(attention_loss__weight=1.0, data__caption_dropout=0.0, adapter__type="lora")
    every = _trainer(tmp_path / "a", world, **kw).train_step()
    all_kept = _trainer(tmp_path / "b", world, attention_loss__max_sigma=1.0, **kw).train_step()
    none_kept = _trainer(tmp_path / "c", world, attention_loss__max_sigma=1e-6, **kw).train_step()
    assert every["loss_attn"] > 0 and all_kept["loss_attn"] == every["loss_attn"]
    assert none_kept["loss_attn"] == 0.0 and none_kept["loss_diff"] == every["loss_diff"]
    with pytest.raises(UserError, match="max_sigma"):
        _trainer(tmp_path / "d", world, attention_loss__max_sigma=1.5, **kw)


def test_bleed_loss_option(tmp_path, world):
    """attention_loss.loss: bleed replaces Dice in the step (same forward); an unknown name is one line."""
    kw = dict(attention_loss__weight=1.0, data__caption_dropout=0.0, adapter__type="lora")
    dice = _trainer(tmp_path / "a", world, **kw).train_step()
    bleed = _trainer(tmp_path / "b", world, attention_loss__loss="bleed", **kw).train_step()
    assert bleed["loss_diff"] == dice["loss_diff"] and 0 <= bleed["loss_attn"] != dice["loss_attn"]
    with pytest.raises(UserError, match="attention_loss.loss"):
        _trainer(tmp_path / "c", world, attention_loss__loss="focal", **kw)


def test_single_blocks_join_the_attention_loss(tmp_path, world):
    """attention_loss.single_blocks: the maps of those single-stream blocks are captured and averaged into the loss;
    choosing no block at all is one line."""
    kw = dict(attention_loss__weight=1.0, data__caption_dropout=0.0, adapter__type="lora")
    double = _trainer(tmp_path / "a", world, **kw)
    both = _trainer(tmp_path / "b", world, attention_loss__single_blocks=[0], **kw)
    n = len(both.transformer.transformer_blocks)
    assert both.capture_keys == [*double.capture_keys, n]
    a, b = double.train_step(), both.train_step()
    assert a["loss_diff"] == b["loss_diff"] and a["loss_attn"] != b["loss_attn"]
    with pytest.raises(UserError, match="choose no block"):
        _trainer(tmp_path / "c", world, attention_loss__blocks=[], **kw)


def test_attention_loss_on_a_head_subset(tmp_path, world):
    """attention_loss.heads: the loss sees only those heads' maps (a different value, same flow-matching loss);
    a head the model lacks, or an empty list, is one line."""
    kw = dict(attention_loss__weight=1.0, data__caption_dropout=0.0, adapter__type="lora")
    every = _trainer(tmp_path / "a", world, **kw)
    first = _trainer(tmp_path / "b", world, attention_loss__heads=[0], **kw)
    assert first.capture.heads == [0] and every.capture.heads is None
    a, b = every.train_step(), first.train_step()
    assert a["loss_diff"] == b["loss_diff"] and a["loss_attn"] != b["loss_attn"]
    n = first.transformer.config.num_attention_heads
    for bad in ([n], []):
        with pytest.raises(UserError, match="attention_loss.heads"):
            _trainer(tmp_path / f"c{len(bad)}", world, attention_loss__heads=bad, **kw)


def test_routing_only_dice_reaches_only_query_and_key_projections(tmp_path, world):
    """attention_loss.routing_only: the same maps and loss, but the Dice gradient stops at each block's q/k."""
    grads = {}
    for routing_only in (False, True):
        t = _trainer(tmp_path / str(routing_only), world, attention_loss__weight=1.0, data__caption_dropout=0.0,
                     adapter__type="lora", attention_loss__routing_only=routing_only)
        batch = t.data.collate(t.order.next(), t.pipe, "cpu", t.dtype, t.noise_gen)
        losses = t.compute_losses(batch)
        named = [(n, p) for n, p in t.transformer.named_parameters() if p.requires_grad]
        g = torch.autograd.grad(losses["loss_attn"], [p for _, p in named], allow_unused=True)
        grads[routing_only] = ({n: (x is not None and float(x.abs().sum()) > 0) for (n, _), x in zip(named, g)},
                               float(losses["loss_attn"].detach()), float(losses["loss_diff"].detach()))
    plain, routed = grads[False], grads[True]
    assert routed[1:] == plain[1:]  # the forward is unchanged: same Dice and flow-matching losses
    qk = ("to_q", "to_k", "add_q_proj", "add_k_proj")
    reached = {n for n, hit in routed[0].items() if hit}
    assert reached and all(any(f".attn.{m}." in n for m in qk) for n in reached), sorted(reached)
    # without the option the Dice gradient also reaches value/output projections upstream
    assert any(hit and not any(f".attn.{m}." in n for m in qk) for n, hit in plain[0].items())


def test_attention_loss_decreases_when_overfitting_one_sample(tmp_path):
    t = _trainer(tmp_path, None, data__toyworld__n=1, data__toyworld__subjects=[2], data__caption_dropout=0.0,
                 adapter__type="lora", optim__lr=1e-2, optim__warmup_steps=0, attention_loss__weight=1.0,
                 train__max_steps=60)
    la = [t.train_step()["loss_attn"] for _ in range(60)]
    first, last = float(np.mean(la[:5])), float(np.mean(la[-10:]))
    assert last < 0.85 * first, (first, last)


def test_resume_is_exact_and_skips_partial_checkpoints(tmp_path, world):
    cfg = write_cfg(tmp_path, world, train__max_steps=6, output__checkpoint_every=2, output__keep_last=3,
                    data__caption_dropout=0.5, train__gradient_accumulation_steps=2, train__ema_decay=0.9,
                    optim__schedule="cosine")
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(["--config", str(cfg), "--output-dir", str(full)])
    main(["--config", str(cfg), "--output-dir", str(cut), "--max-steps", "5"])
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    # Killed before checkpoint-5 was complete: the metrics already hold step 5; leftovers of interrupted writes.
    shutil.rmtree(cut / "checkpoint-5")
    (cut / "checkpoint-6.tmp-x1y2").mkdir()
    torch.save({"garbage": 1}, cut / "checkpoint-6.tmp-x1y2" / "state.pt")
    (cut / "checkpoint-8").mkdir()
    torch.save({"garbage": 1}, cut / "checkpoint-8" / "state.pt")   # renamed dir without meta.json: incomplete
    with pytest.raises(UserError, match="--resume"):
        main(["--config", str(cfg), "--output-dir", str(cut)])       # a fresh run never overwrites checkpoints
    main(["--config", str(cfg), "--output-dir", str(cut), "--resume"])
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    keys = LOSS_KEYS + ("moe_aux",)
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len({r["lr"] for r in a}) > 2                              # the schedule really moved


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_dataset", "empty_dataset", "mask_missing",
                                  "lambda_without_masks"])
def test_bad_configs_stop_with_one_line(tmp_path, world, case):
    if not (world / "metadata.jsonl").exists():
        from train.data import ToyWorldSource, ensure_toyworld

        ensure_toyworld(ToyWorldSource(**{**BASE["data"]["toyworld"], "n": 4, "folder": str(world)}), tmp_path)
    over: dict = {}
    if case == "unknown_key":
        over = {"train__lrr": 1.0}
    elif case == "wrong_type":
        over = {"train__max_steps": "ten"}
    elif case == "missing_dataset":
        over = {"data__toyworld": None, "data__dataset": str(tmp_path / "nope")}
    elif case == "empty_dataset":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metadata.jsonl").write_text("")
        over = {"data__toyworld": None, "data__dataset": str(tmp_path / "empty")}
    elif case == "mask_missing":
        shutil.copytree(world, tmp_path / "ds")
        (tmp_path / "ds" / "masks" / "00000_0.png").unlink()
        over = {"data__toyworld": None, "data__dataset": str(tmp_path / "ds")}
    elif case == "lambda_without_masks":
        over = {"data__with_references": False}
    needle = {"unknown_key": "train.lrr", "wrong_type": "train.max_steps", "missing_dataset": "not found",
              "empty_dataset": "empty", "mask_missing": "metadata.jsonl:1", "lambda_without_masks": "masks"}[case]
    cfg = write_cfg(tmp_path, None, **over) if case != "lambda_without_masks" else write_cfg(tmp_path, world, **over)
    with pytest.raises(UserError) as e:
        main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "run.lock").exists()          # a failed start releases the folder


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    cfg = write_cfg(tmp_path, None, train__bogus=1)
    res = subprocess.run([sys.executable, "-m", "train.pretrain", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("error:") and "train.bogus" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["tiny_pretrain", "recipe/base", "recipe/base_text", "recipe/base_shift",
                                  "recipe/base_large_batch", "recipe/base_highnoise",
                                  "toy_adapter_baseline",
                                  "toy_adapter_attn", "toy_adapter_attn_moe", "flux_dev_adapter"])
def test_shipped_configs_parse(name):
    cfg = load_config(REPO / "train" / "configs" / f"{name}.yaml", PretrainConfig)
    assert cfg.train.mode == ("base" if name.startswith("recipe/") else "adapter")
    if name == "flux_dev_adapter":  # the paper's settings
        assert (cfg.data.resolution, cfg.data.ref_long_side_multi, cfg.adapter.lora_rank) == (512, 320, 512)
        assert (cfg.adapter.moe.num_experts, cfg.adapter.moe.top_k, cfg.adapter.type) == (4, 1, "moe_lora")


def test_gradient_checkpointing_gives_the_same_training(tmp_path, world):
    runs = []
    for gc in (False, True):
        t = _trainer(tmp_path / str(gc), world, model__gradient_checkpointing=gc, adapter__type="lora")
        runs.append([t.train_step() for _ in range(2)])
    for a, b in zip(*runs):
        assert a["loss_diff"] == pytest.approx(b["loss_diff"], rel=1e-5)
        assert a["loss_attn"] == pytest.approx(b["loss_attn"], rel=1e-5) and a["loss_attn"] > 0
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_two_process_data_parallel_run_on_cpu(tmp_path, world):
    """torchrun with 2 CPU processes (gloo): one metrics file, batches split by rank, losses averaged."""
    out = tmp_path / "ddp"
    cfg = write_cfg(tmp_path, world, train__max_steps=2, adapter__type="lora")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "train.pretrain", "--config", str(cfg), "--output-dir", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    single = tmp_path / "single"
    main(["--config", str(cfg), "--output-dir", str(single), "--max-steps", "1"])
    assert read_metrics(out)[0]["loss"] != read_metrics(single)[0]["loss"]   # rank 1's batch entered the mean
    assert len(load_checkpoint(out / "checkpoint-2")["rng"]) == 2             # one noise stream per rank
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_init_adapter_starts_from_saved_weights_and_adds_experts(tmp_path, world):
    from multicrafter.moe_lora import moe_modules

    first = tmp_path / "first"
    main(["--config", str(write_cfg(tmp_path / "a", world, adapter__type="lora")), "--output-dir", str(first)])
    saved = load_checkpoint(first / "checkpoint-3")["trainable"]
    t = _trainer(tmp_path / "b", world, adapter__type="moe_lora", adapter__init_adapter=str(first / "adapter"))
    named = dict(t.transformer.named_parameters())
    assert all(torch.equal(named[n].float(), v) for n, v in saved.items())   # LoRA continues from the file
    assert moe_modules(t.transformer) and all(named[n].requires_grad for n in saved)
    t.train_step()
    cfg = json.loads((t.save_final() / "adapter_config.json").read_text())
    assert cfg["moe"]["num_experts"] == 4 and cfg["extra"]["init_adapter"] == str(first / "adapter")


def test_encoding_on_the_fly_equals_the_cache(tmp_path, world):
    losses = []
    for cache in (True, False):
        t = _trainer(tmp_path / str(cache), world, data__cache=cache, data__caption_dropout=0.5, adapter__type="lora")
        losses.append([(r["loss_diff"], r["loss_attn"]) for r in (t.train_step() for _ in range(3))])
        assert bool(t.data._cache) == cache
    # the cache pass encodes 64 samples per VAE call, the fly a batch: equal up to float rounding
    flat = [[v for pair in run for v in pair] for run in losses]
    assert flat[0] == pytest.approx(flat[1], rel=1e-5)


def test_batched_encoding_equals_one_sample_at_a_time(tmp_path, world):
    """The cache pass encodes in chunks (one VAE call per image size, one text call per chunk); every entry must be
    what encoding that sample alone gives, references, ids and masks included."""
    t = _trainer(tmp_path, world, adapter__type="lora")
    batched = dict(t.data._cache)
    assert len(batched) == len(t.data) > 2
    t.data._cache = {}
    for i in range(len(t.data)):
        one = t.data.encode(i, t.pipe, t.device, t.dtype)
        for key in ("prompt_embeds", "pooled", "latents", "masks"):
            torch.testing.assert_close(one[key], batched[i][key], rtol=1e-5, atol=1e-5)
        assert one["grid"] == batched[i]["grid"]
        if one["refs"] is not None:
            torch.testing.assert_close(one["refs"].latents, batched[i]["refs"].latents, rtol=1e-5, atol=1e-5)
            assert torch.equal(one["refs"].ids, batched[i]["refs"].ids)
            assert one["refs"].lengths == batched[i]["refs"].lengths and one["refs"].grids == batched[i]["refs"].grids


def test_disk_cache_is_reused_and_keyed_by_its_inputs(tmp_path, world, monkeypatch):
    """A second run loads the encodings from cache_dir instead of encoding; a changed input gets a new file."""
    from train.data import TrainingSet

    cache = tmp_path / "cache"
    first = _trainer(tmp_path / "a", world, data__cache_dir=str(cache), adapter__type="lora")
    files = list(cache.glob("encodings-*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(TrainingSet, "encode_many",
                        lambda *a, **k: pytest.fail("encoded although the cache was on disk"))
    again = _trainer(tmp_path / "b", world, data__cache_dir=str(cache), adapter__type="lora")
    assert torch.equal(again.data._cache[0]["latents"], first.data._cache[0]["latents"])
    monkeypatch.undo()
    # another sequence length is another encoding: a new file, the old one untouched
    _trainer(tmp_path / "c", world, data__cache_dir=str(cache), data__max_sequence_length=12, adapter__type="lora")
    assert len(list(cache.glob("encodings-*.pt"))) == 2
    # a damaged file is re-encoded, not trusted
    files[0].write_bytes(b"not a torch file")
    fixed = _trainer(tmp_path / "d", world, data__cache_dir=str(cache), adapter__type="lora")
    assert torch.equal(fixed.data._cache[0]["latents"], first.data._cache[0]["latents"])


def test_buckets_and_batch_order():
    from PIL import Image

    from train.data import BatchOrder, bucket_size, cover_crop

    assert bucket_size(200, 100, 64, False) == (64, 64)
    assert bucket_size(200, 100, 64, True) == (80, 48)               # nearest aspect 16:9, ~64² pixels
    assert bucket_size(100, 100, 64, True) == (64, 64)
    assert cover_crop(Image.new("RGB", (200, 100)), (80, 48)).size == (80, 48)
    keys = [("a",), ("b",)] * 5
    order = BatchOrder(keys, 2, seed=3)
    epoch0 = order.epoch_batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert all(len({keys[i] for i in b}) == 1 for b in epoch0)      # one layout per batch
    assert epoch0 == BatchOrder(keys, 2, seed=3).epoch_batches(0) and epoch0 != order.epoch_batches(1)
    r0, r1 = BatchOrder(keys, 2, 3, 2, 0).epoch_batches(0), BatchOrder(keys, 2, 3, 2, 1).epoch_batches(0)
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    seen = [order.next() for _ in range(len(epoch0) + 1)]
    assert seen[:-1] == epoch0 and order.state_dict() == {"epoch": 1, "index": 1}
    # three processes share one position: 6 batches of this epoch -> 2 each, so after any number of steps every
    # rank is at rank 0's (epoch, index), and restoring rank 0's state on another rank resumes its exact stream
    ranks = [BatchOrder(keys, 2, 3, 3, r) for r in range(3)]
    assert {len(r.epoch_batches(e)) for r in ranks for e in range(4)} == {2}
    for _ in range(7):
        streams = [r.next() for r in ranks]
    assert len({str(r.state_dict()) for r in ranks}) == 1
    resumed = BatchOrder(keys, 2, 3, 3, 2)
    resumed.load_state_dict(ranks[0].state_dict())
    assert [resumed.next() for _ in range(5)] == [ranks[2].next() for _ in range(5)]
    assert len({i for b in streams for i in b}) == sum(len(b) for b in streams)   # the ranks' batches are disjoint


def test_references_at_timestep_zero_train_and_carry_to_inference(tmp_path, world):
    """model.ref_timestep_zero trains with the per-token t = 0 modulation and the adapter remembers it."""
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, world, model__ref_timestep_zero=True, adapter__type="lora")
    assert main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    plain_out = tmp_path / "plain"
    assert main(["--config", str(write_cfg(tmp_path / "p", world, adapter__type="lora")), "--output-dir",
                 str(plain_out)]) == 0
    zero, plain = read_metrics(out), read_metrics(plain_out)
    assert zero[0]["loss_diff"] != plain[0]["loss_diff"]  # the forward differs from the shared-timestep one
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    pipe.load_adapter(out / "adapter")
    assert pipe.reference_options.ref_timestep_zero


def test_stopping_with_max_steps_logs_what_an_uninterrupted_run_logs(tmp_path, world, monkeypatch):
    """With log_every 2 (and runs this short treated as long), a run cut at step 3 logs step 3 so its curve ends
    where it stopped, and drops that record when resumed, so the resumed file equals the uninterrupted one."""
    monkeypatch.setattr("train.metrics_log.SHORT_RUN_STEPS", 0)
    cfg = write_cfg(tmp_path, world, train__max_steps=4, output__log_every=2, output__checkpoint_every=0,
                    adapter__type="lora", attention_loss__weight=0.0)
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(["--config", str(cfg), "--output-dir", str(full)])
    main(["--config", str(cfg), "--output-dir", str(cut), "--max-steps", "3"])
    assert [r["step"] for r in read_metrics(cut)] == [2, 3]
    main(["--config", str(cfg), "--output-dir", str(cut), "--resume"])
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    assert [[r[k] for k in LOSS_KEYS] for r in a] == [[r[k] for k in LOSS_KEYS] for r in b]


def test_a_short_run_of_a_long_config_logs_every_step(tmp_path, world):
    """--max-steps 6 of a config with log_every 10 (what the Train tab starts): the curve has all 6 points."""
    cfg = write_cfg(tmp_path, world, train__max_steps=2000, output__log_every=10, output__checkpoint_every=0,
                    adapter__type="lora", attention_loss__weight=0.0, data__num_validation=0)
    out = tmp_path / "run"
    assert main(["--config", str(cfg), "--output-dir", str(out), "--max-steps", "6"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_folder_held_by_a_live_run_is_refused_before_anything_is_written(tmp_path, world):
    from train.run_lock import LOCK_FILE, RunLock

    cfg = write_cfg(tmp_path, world, adapter__type="lora")
    out = tmp_path / "held"
    with RunLock(out):
        for extra in ([], ["--resume"]):
            with pytest.raises(UserError) as err:
                main(["--config", str(cfg), "--output-dir", str(out), *extra])
            assert str(err.value) == (f"output dir {out} is used by a running job (pid {os.getpid()}); stop it or "
                                      "choose another --output-dir")
            assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert not out.exists()   # the folder the lock made goes with it: the runs wrote nothing


def test_ref_timestep_zero_reaches_validation_and_survives_it(tmp_path, world):
    from multicrafter.ref_timestep import find_ref_timestep

    t = _trainer(tmp_path, world, model__ref_timestep_zero=True, adapter__type="lora", attention_loss__weight=0.0)
    assert t.pipe.reference_options.ref_timestep_zero          # validation samples use the trained conditioning
    t.validate()
    assert find_ref_timestep(t.unwrapped).enabled               # training after a validation still uses t = 0


def test_final_pipeline_save_swaps_a_complete_folder_in(tmp_path, world, monkeypatch):
    t = _trainer(tmp_path, world, train__mode="base", attention_loss__weight=0.0, data__with_references=False)
    old = t.output_dir / "pipeline"
    old.mkdir(parents=True)
    (old / "marker.txt").write_text("previous save")
    real = t.pipe.save_pretrained

    def broken(folder, **kw):
        (Path(folder) / "model_index.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(t.pipe, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        t.save_final()
    assert sorted(p.name for p in old.iterdir()) == ["marker.txt"]           # the previous save is untouched
    assert not [p for p in t.output_dir.iterdir() if p.name.startswith(".pipeline")]
    monkeypatch.setattr(t.pipe, "save_pretrained", real)
    assert t.save_final() == old
    assert (old / "model_index.json").is_file() and not (old / "marker.txt").exists()
    assert [p.name for p in t.output_dir.iterdir() if "pipeline" in p.name] == ["pipeline"]


def test_positions_captions_replace_the_text_not_the_stream(tmp_path, world):
    """positions_caption_prob = 1: every sample is trained on 'an object on the left, ...' (its own embedding, cached
    beside the caption's); p = 0 keeps the generator stream, so existing runs are unchanged."""
    from multicrafter.toyworld.prompts import restyle_prompt

    t = _trainer(tmp_path / "p", world, adapter__type="lora", data__caption_dropout=0.0,
                 data__positions_caption_prob=1.0)
    batch = t.data.collate([0, 1], t.pipe, t.device, t.dtype, torch.Generator().manual_seed(0))
    assert batch["positions_caption"].all()
    assert batch["captions"] == [restyle_prompt(t.data.items[i].caption, "positions") for i in (0, 1)]
    assert all("an object" in c for c in batch["captions"])
    embeds, pooled, _ = t.pipe.encode_prompt(prompt=batch["captions"], prompt_2=None, device=t.device,
                                             max_sequence_length=t.cfg.data.max_sequence_length)
    torch.testing.assert_close(batch["prompt_embeds"], embeds.to(t.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["pooled"], pooled.to(t.dtype), rtol=1e-5, atol=1e-5)
    full = t.data._cache[0]["prompt_embeds"]
    assert not torch.allclose(full, batch["prompt_embeds"][:1])  # the caption's own embedding is a different one

    off = _trainer(tmp_path / "o", world, adapter__type="lora", data__caption_dropout=0.5)
    g = torch.Generator().manual_seed(3)
    off.data.collate([0, 1], off.pipe, off.device, off.dtype, g)
    after = torch.rand(1, generator=g)
    g2 = torch.Generator().manual_seed(3)
    torch.rand(2, generator=g2)  # p = 0 draws only the caption-dropout uniforms
    assert torch.equal(after, torch.rand(1, generator=g2))


def test_positions_captions_need_toyworld_captions():
    from types import SimpleNamespace

    from train.data import DataConfig, positions_caption

    assert positions_caption(SimpleNamespace(caption="a red-blue striped star on the left", line=3)) == \
        "an object on the left"
    with pytest.raises(UserError, match=r"metadata.jsonl:7: data.positions_caption_prob needs ToyWorld captions"):
        positions_caption(SimpleNamespace(caption="a photo of my dog", line=7))
    with pytest.raises(UserError, match="positions_caption_prob must be in"):
        DataConfig(dataset="x", positions_caption_prob=1.5)
