"""Every YAML the README and the recipes name loads into its script's dataclasses: a typo, a key the dataclass lost
or a refused combination (e.g. a timestep shift with a scheme that ignores it) fails here, not hours into a run."""

from pathlib import Path

import pytest

from train.common import load_config
from train.ippo import IPPOConfig
from train.pretrain import PretrainConfig
from train.vae import VAEConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "train" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
ACCELERATE = {"accelerate_ddp.yaml", "accelerate_fsdp.yaml"}   # accelerate's own launcher configs, not ours


def _cls(path: Path) -> type:
    if path.stem.endswith("_ippo"):
        return IPPOConfig
    return VAEConfig if path.stem.endswith("_vae") else PretrainConfig


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in ACCELERATE], ids=lambda p: p.name)
def test_config_loads_into_its_dataclass(path):
    cfg = load_config(path, _cls(path))
    assert isinstance(cfg, _cls(path))


def test_toy_rows_share_the_base_budget_and_timesteps():
    """The ablation's rows differ only in what they add (docs/toy_model.md): same steps, seed, schedule and timesteps."""
    rows = {n: load_config(CONFIG_DIR / f"toy_adapter_{n}.yaml", PretrainConfig)
            for n in ("baseline", "attn", "attn_moe")}
    for name, cfg in rows.items():
        assert (cfg.train.max_steps, cfg.train.seed, cfg.data.batch_size) == (2000, 0, 16), name
        assert (cfg.train.timesteps.scheme, cfg.train.timesteps.shift) == ("shifted", 8.0), name
        assert cfg.optim.lr == rows["baseline"].optim.lr, name
    assert rows["baseline"].attention_loss.weight == 0 and rows["attn"].attention_loss.weight == 0.1
    assert rows["attn_moe"].attention_loss.weight == 0.1
