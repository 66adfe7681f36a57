"""train.vae on a tiny config: a resumed run logs exactly the losses of an uninterrupted one, a second run into a
folder with checkpoints is refused, and the final VAE folder is swapped in complete."""

from pathlib import Path

import pytest
import torch
import yaml

from multicrafter.errors import UserError
from train.metrics_log import read_metrics
from train.vae import main

TINY = {
    "model": {"block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 4},
    "data": {"seed": 0, "scene_size": 32, "ref_size": 16, "crop": 16, "ref_fraction": 0.25},
    "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "keep_last": 3, "log_every": 1, "threads": 1,
              "stats_samples": 2, "device": "cpu", "kl_weight": 0.01},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "schedule": "cosine"},
}


@pytest.fixture()
def config(tmp_path) -> Path:
    p = tmp_path / "vae.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _losses(folder: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["l1"], r["mse"], r["kl"], r["lr"]) for r in read_metrics(folder)]


def test_resume_is_bit_exact_and_the_final_vae_loads(tmp_path, config):
    threads = torch.get_num_threads()
    try:
        full, cut = tmp_path / "full", tmp_path / "cut"
        assert main(["--config", str(config), "--output-dir", str(full)]) == 0
        assert main(["--config", str(config), "--output-dir", str(cut), "--max-steps", "2"]) == 0
        assert not (cut / "vae").exists()                        # not finished: no VAE yet
        with pytest.raises(UserError, match="already holds checkpoints: pass --resume"):
            main(["--config", str(config), "--output-dir", str(cut)])
        assert main(["--config", str(config), "--output-dir", str(cut), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = _losses(full), _losses(cut)
    assert [r[0] for r in a] == [1, 2, 3, 4]
    assert a == b                                                 # exactly equal, not approximately
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(cut / "vae")
    assert vae.config.block_out_channels == [8, 8] and vae.config.scaling_factor != 1.0
    assert [p.name for p in cut.iterdir() if "vae" in p.name] == ["vae"]   # no temp folders left


def test_a_folder_held_by_a_live_run_is_refused_before_anything_is_written(tmp_path, config):
    from train.run_lock import LOCK_FILE, RunLock

    out = tmp_path / "held"
    with RunLock(out):
        with pytest.raises(UserError, match=f"output dir {out} is used by a running job") as err:
            main(["--config", str(config), "--output-dir", str(out)])
        assert "\n" not in str(err.value)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert not out.exists()   # the folder the lock made goes with it: the runs wrote nothing
