"""The IPPO trainer end to end on the tiny model: metrics keys, grids, a loadable adapter, exact resume, only adapter
weights training, config and reward failures handled, and an overfit run that raises the reward."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from multicrafter import MultiCrafterPipeline
from multicrafter.errors import UserError
from multicrafter.rewards.base import RewardOutput
from multicrafter.rewards.toyworld_reward import ToyReward
from multicrafter.rollout import GroupInput, RolloutOptions, rollout
from train.config import load_config
from train.ippo import IPPOConfig, cached_groups, main, train
from train.ippo_inputs import load_prompts, score
from train.metrics_log import read_metrics

CONFIG = Path(__file__).resolve().parent.parent / "train" / "configs" / "tiny_ippo.yaml"
REQUIRED = ("step", "reward", "reward_text", "reward_aes", "reward_id", "ratio_mean", "ratio_first", "clip_frac",
            "approx_kl", "window_start", "zero_std_frac", "step_ratio_mean", "step_ratio_min", "step_ratio_max",
            "step_ratio_by_window_step", "ratio_min", "ratio_max")
VOLATILE = ("time_rollout", "time_reward", "time_train")


def _cfg(**overrides):
    return load_config(CONFIG, IPPOConfig, overrides)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("ippo2")
    main(["--config", str(CONFIG), "--output-dir", str(out), "--max-steps", "2"])
    return out


def test_two_iterations_write_every_metric_grids_and_an_adapter(two_steps):
    recs = read_metrics(two_steps)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["ratio_first"] == 1.0 and r["ratio_first_max_dev"] == 0.0   # on-policy: exactly 1
        assert r["nfe_per_image"] == 4                                          # T network evaluations per image
        assert len(r["step_ratio_by_window_step"]) == 2
        assert all(isinstance(r[k], float) for k in ("reward", "reward_text", "reward_aes", "reward_id"))
    assert [r["window_start"] for r in recs] == [0, 1]                          # progressive, stride 1
    assert recs[0]["ratio_min"] != recs[0]["ratio_max"]                         # second inner update moved it
    grids = sorted((two_steps / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_000001.png", "step_000002.png"]
    assert Image.open(grids[0]).size == (4 * 32, 2 * 32)                        # G columns, one row per group
    assert (two_steps / "checkpoint-2" / "state.pt").is_file()


def test_the_adapter_loads_and_only_adapter_weights_changed(two_steps):
    trained = MultiCrafterPipeline.from_pretrained("tiny")
    base_sd = {k: v.clone() for k, v in trained.transformer.state_dict().items()}
    trained.load_adapter(two_steps / "adapter")
    state = torch.load(two_steps / "checkpoint-2" / "state.pt", weights_only=False)
    named = dict(trained.transformer.named_parameters())
    assert set(state["adapter"]) == {n for n, p in named.items() if p.requires_grad}
    assert any(".lora_" in n for n in state["adapter"]) and any("expert_" in n for n in state["adapter"])
    for n, v in state["adapter"].items():
        assert torch.equal(named[n].detach(), v), n
    assert any(float(v.abs().max()) > 0 for n, v in state["adapter"].items() if "lora_B" in n)
    # the frozen base is untouched: every non-adapter weight equals a fresh tiny model's
    for k, v in trained.transformer.state_dict().items():
        base_key = k.replace(".base_layer.", ".").replace(".base.", ".")
        if "lora_" in k or "expert_" in k or ".router." in k:
            continue
        assert torch.equal(v, base_sd[base_key]), k


def test_resume_continues_exactly(two_steps, tmp_path):
    main(["--config", str(CONFIG), "--output-dir", str(tmp_path), "--max-steps", "1"])
    main(["--config", str(CONFIG), "--output-dir", str(tmp_path), "--max-steps", "2", "--resume"])
    strip = lambda recs: [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]  # noqa: E731
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(two_steps))


@pytest.mark.parametrize("override,match", [
    ({"sampling.bogus": 1}, "unknown config key 'sampling.bogus'"),
    ({"window.size": 5}, "window size must be in 1..4"),
    ({"sampling.group_size": 1}, "group_size must be >= 2"),
    ({"sampling.noise_level": 0.0}, "noise_level must be > 0"),
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"reward.weights": {"beauty": 1.0}}, "unknown component"),
    ({"reward.kind": "nonsense"}, "reward.kind"),
    ({"train.gradient_accumulation_steps": 2}, "gradient_accumulation_steps must be 1"),
])
def test_bad_configs_are_one_line_errors(override, match, tmp_path):
    with pytest.raises(UserError, match=match) as err:
        train(_cfg(**override), tmp_path, max_steps=1)
    assert "\n" not in str(err.value)


def test_a_second_run_into_a_folder_with_checkpoints_is_refused(two_steps):
    before = sorted(p.name for p in two_steps.iterdir())
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume") as err:
        main(["--config", str(CONFIG), "--output-dir", str(two_steps), "--max-steps", "1"])
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in two_steps.iterdir()) == before and len(read_metrics(two_steps)) == 2


def test_lr_schedule_horizon_is_train_max_steps_even_when_stopping_early(tmp_path):
    # linear decay over train.max_steps (2) * inner_updates (2) = 4 optimizer steps: after step 1 (2 updates) the lr
    # is half the base lr; with --max-steps 1 as horizon it would already be 0
    cfg = _cfg(**{"optim.schedule": "linear", "train.sample_every": 0})
    train(cfg, tmp_path, max_steps=1, log=lambda s: None)
    assert read_metrics(tmp_path)[0]["lr"] == pytest.approx(0.5e-3)


def test_an_adapter_trained_with_references_at_t0_keeps_them_in_rollouts(tmp_path):
    from multicrafter.adapters import AdapterConfig, add_adapter, save_adapter
    from multicrafter.ref_timestep import find_ref_timestep
    from train.ippo import ModelConfig, setup_adapter

    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    add_adapter(pipe.transformer, AdapterConfig(lora_rank=2, lora_alpha=2.0, extra={"ref_timestep_zero": True}))
    save_adapter(pipe.transformer, tmp_path / "t0")
    fresh = MultiCrafterPipeline.from_pretrained("tiny")
    setup_adapter(fresh, ModelConfig(adapter=str(tmp_path / "t0")))
    state = find_ref_timestep(fresh.transformer)
    assert state is not None and state.enabled


def test_cli_bad_config_prints_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: {size: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "train.ippo", "--config", str(bad)], capture_output=True, text=True,
                          cwd=CONFIG.parent.parent.parent, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ") and "window" in proc.stderr


def test_a_reward_that_raises_scores_zero_and_the_run_finishes(tmp_path):
    def broken(batch):
        raise RuntimeError("reward model exploded")

    res = train(_cfg(**{"train.sample_every": 0}), tmp_path, max_steps=2, reward_fn=broken, log=lambda s: None)
    recs = read_metrics(tmp_path)
    assert len(recs) == 2 and all(r["reward"] == 0.0 and r["reward_failures"] == 8 for r in recs)
    assert all(r["zero_std_frac"] == 1.0 and r["ratio_first"] == 1.0 for r in recs)
    assert Path(res["adapter_dir"], "adapter_config.json").is_file()


def test_images_without_subjects_and_bad_reward_values_give_defined_zeros():
    blank = [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in range(2)]
    ctx = SimpleNamespace(prompt="a red-blue striped star on the left, on a plain white background",
                          references=[Image.new("RGB", (32, 32), (255, 0, 0))], metadata=None)
    ro = SimpleNamespace(groups=[ctx], images=blank, group_slice=lambda g: slice(0, 2))
    s = score(ToyReward(), ro, {"text": 1.0, "aes": 1.0, "id": 1.0})
    assert s.components["id"] == [0.0, 0.0] and s.failed == 0 and s.notes

    def odd(batch):
        return RewardOutput(components={"text": [float("nan"), 0.5], "aes": [1.0]})

    s = score(odd, ro, {"text": 1.0, "aes": 1.0, "id": 0.0})
    assert s.components["text"] == [0.0, 0.5] and s.components["aes"] == [0.0, 0.0]
    assert all(np.isnan(s.components["id"]))                     # unweighted and not computed: logged as null
    assert any("non-finite" in n for n in s.notes) and any("'aes'" in n for n in s.notes)


# ----------------------------------------------------------------------------------------------- overfit

SIZE = 16


def _decoder_direction(pipe) -> np.ndarray:
    """The pixel pattern the tiny random VAE decoder responds to most (top left singular vector of its Jacobian at
    the model's own outputs). Brightness or colour barely move through a random decoder; this direction does."""
    opts = RolloutOptions(num_steps=4, height=SIZE, width=SIZE, group_size=4, max_sequence_length=16)
    ro = rollout(pipe, [GroupInput("x")], [0, 1], opts, generator=torch.Generator().manual_seed(123), decode=False)
    vae = pipe.vae

    def decode(zp):
        z = pipe._unpack_latents(zp, SIZE, SIZE, pipe.vae_scale_factor) / vae.config.scaling_factor
        return vae.decode(z + vae.config.shift_factor, return_dict=False)[0].flatten()

    jac = torch.stack([torch.autograd.functional.jacobian(decode, ro.final_latents[i : i + 1], vectorize=True)
                       .reshape(3 * SIZE**2, -1) for i in range(4)]).mean(0)
    return torch.linalg.svd(jac, full_matrices=False)[0][:, 0].reshape(3, SIZE, SIZE).permute(1, 2, 0).numpy()


def test_overfit_on_one_prompt_raises_the_reward(tmp_path):
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    u = _decoder_direction(pipe)

    def values(images):
        return [float((u * (np.asarray(im, dtype=np.float32) / 127.5 - 1)).sum()) for im in images]

    def reward(batch):  # an "aesthetic" the tiny model can learn: alignment with the decoder's strongest pattern
        return RewardOutput(components={"aes": values(batch.images)})

    cfg = _cfg(**{"prompts.limit": 1, "sampling.height": SIZE, "sampling.width": SIZE, "sampling.group_size": 8,
                  "sampling.micro_batch": 0, "train.groups_per_step": 1, "train.sample_every": 0,
                  "train.save_every": 0, "reward.weights": {"aes": 1.0}, "optim.lr": 0.04, "gspo.inner_updates": 1})
    res = train(cfg, tmp_path, max_steps=20, reward_fn=reward, log=lambda s: None)
    group = load_prompts(cfg.prompts, tmp_path)[0]
    opts = RolloutOptions(num_steps=4, height=SIZE, width=SIZE, group_size=8, max_sequence_length=16)

    def evaluate():
        ro = rollout(pipe, [group] * 4, [0, 1], opts, generator=torch.Generator().manual_seed(999))
        return float(np.mean(values(ro.images)))

    before = evaluate()                   # a fresh adapter has B = 0: the base model is the starting policy
    pipe.load_adapter(res["adapter_dir"])
    after = evaluate()
    assert after > before + 0.3, (before, after)
    recs = read_metrics(tmp_path)
    assert len(recs) == 20 and all(r["ratio_first"] == 1.0 for r in recs)
    assert json.loads(Path(res["adapter_dir"], "adapter_config.json").read_text())["extra"]["trained_by"] == "ippo"


@pytest.mark.parametrize("name", ["tiny_ippo", "toy_ippo", "flux_dev_ippo"])
def test_shipped_configs_parse(name):
    cfg = load_config(CONFIG.parent / f"{name}.yaml", IPPOConfig)
    assert cfg.window_schedule().steps(0) == list(range(cfg.window.size))
    if name == "flux_dev_ippo":   # the paper's settings
        assert (cfg.sampling.num_steps, cfg.window.size, cfg.window.stride) == (16, 2, 1)


def test_the_group_cache_never_drops_a_prompt_the_step_needs():
    """A full cache met a step holding one cached and one new prompt: clearing it dropped the cached one (KeyError in
    the 36th step of a 2-groups-per-step run on a GPU)."""
    encoded: list[int] = []

    def encode(i: int) -> str:
        encoded.append(i)
        return f"ctx{i}"

    cache: dict = {}
    for step_ids in ([0, 1], [2, 3], [1, 4], [5, 5], [4, 6]):
        got = cached_groups(cache, step_ids, encode, limit=4)
        assert got == [f"ctx{i}" for i in step_ids]
        assert len(cache) <= 4
    assert encoded == [0, 1, 2, 3, 4, 5, 6]  # [1, 4] kept 1 when it cleared; [5, 5] encoded 5 once


def test_a_folder_held_by_a_live_run_is_refused_before_anything_is_written(tmp_path):
    from train.run_lock import LOCK_FILE, RunLock

    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"output dir {tmp_path} is used by a running job") as err:
            main(["--config", str(CONFIG), "--output-dir", str(tmp_path), "--max-steps", "1"])
        assert "\n" not in str(err.value)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]
    assert list(tmp_path.iterdir()) == []
