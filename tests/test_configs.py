"""Every shipped YAML loads into its script's dataclasses (a typo, a key the dataclass lost or a refused combination
fails here, not hours into a run), and every config the Train tab lists runs from a fresh clone: its model resolves
to shipped assets (toy, tiny) or is a hub id its header marks as needing a GPU, and its data is made on the fly or is
a dataset the user names. The toy recipe's stage configs (train/configs/recipe/) start from earlier stages' outputs
and are never listed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from demo import train_tab as tt
from multicrafter import presets
from train.config import load_config
from train.ippo import IPPOConfig
from train.pretrain import PretrainConfig
from train.vae import VAEConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "train" / "configs"
ACCELERATE = {"accelerate_ddp.yaml"}   # accelerate's own launcher configs, not ours
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name not in ACCELERATE)
PRETRAIN = {"tiny_pretrain.yaml", "toy_adapter_baseline.yaml", "toy_adapter_attn.yaml", "toy_adapter_attn_moe.yaml",
            "flux_dev_adapter.yaml", "flux_dev_adapter_24gb.yaml"}
IPPO = {"tiny_ippo.yaml", "toy_ippo.yaml", "flux_dev_ippo.yaml", "flux_dev_ippo_24gb.yaml"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cls(path: Path) -> type:
    stage = tt.config_stage(_raw(path))
    if stage == "ippo":
        return IPPOConfig
    return VAEConfig if "block_out_channels" in _raw(path).get("model", {}) else PretrainConfig


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab")
    settings = tt.TrainSettings(runs_dir=root / "runs", data_dir=root / "data")
    return {mode: tt.list_configs(settings, mode) for mode in ("pretrain", "ippo")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_loads_into_its_dataclass(path):
    cfg = load_config(path, _cls(path))
    assert isinstance(cfg, _cls(path))


def test_the_train_tab_lists_each_stage_and_no_recipe_or_launcher_config(listed):
    assert set(listed["pretrain"]) == PRETRAIN and set(listed["ippo"]) == IPPO
    recipe = {p.name for p in (CONFIG_DIR / "recipe").glob("*.yaml")}
    assert recipe and not recipe & (PRETRAIN | IPPO)
    assert all(tt.config_stage(_raw(p)) is None for p in (CONFIG_DIR / "recipe").glob("*.yaml"))
    assert all(tt.config_stage(_raw(CONFIG_DIR / n)) is None for n in ACCELERATE if (CONFIG_DIR / n).is_file())


def test_the_stage_comes_from_the_content_not_the_file_name(tmp_path):
    names = {"ippo_like_name.yaml": "tiny_pretrain.yaml", "adapter.yaml": "tiny_ippo.yaml",
             "x_pretrain.yaml": "recipe/base.yaml", "y_pretrain.yaml": "recipe/vae.yaml",
             "z_ippo.yaml": "accelerate_ddp.yaml"}
    for new, old in names.items():
        (tmp_path / new).write_text((CONFIG_DIR / old).read_text())
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    settings = tt.TrainSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", configs_dir=tmp_path)
    assert tt.list_configs(settings, "pretrain") == ["ippo_like_name.yaml"]
    assert tt.list_configs(settings, "ippo") == ["adapter.yaml"]


def _strings(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, key)
    elif isinstance(node, str):
        yield key, node


@pytest.mark.parametrize("name", sorted(PRETRAIN | IPPO))
def test_a_listed_config_resolves_on_a_fresh_clone(name):
    path = CONFIG_DIR / name
    raw = _raw(path)
    cfg = load_config(path, _cls(path))
    model = cfg.model.name
    source = cfg.prompts if isinstance(cfg, IPPOConfig) else cfg.data
    if model in presets.PRESETS:
        if model == "toy":
            assert (Path(presets.resolve_model_path("toy")) / "model_index.json").is_file()
        adapter = getattr(cfg.model, "adapter", None)
        if adapter:   # a named adapter of the shipped toy model
            assert (presets.TOY_DIR / "adapters" / adapter / "adapter_config.json").is_file()
        assert source.toyworld is not None and source.dataset is None   # made on the fly
        # nothing is read from runs/: paths there are only written (ToyWorld folders, caches, outputs)
        reads = [(k, v) for k, v in _strings(raw) if v.startswith("runs/")]
        assert all(k in ("folder", "cache_dir", "output_dir") for k, _ in reads), reads
    else:
        assert HUB_ID.fullmatch(model) and not Path(model).exists() and presets.resolve_model_path(model) == model
        header = path.read_text().split("\nmodel:")[0]
        assert "GPU" in header and model in header


@pytest.mark.parametrize("name,section", [("toy_adapter_attn.yaml", "data"), ("toy_ippo.yaml", "prompts")])
def test_a_dataset_override_replaces_the_toyworld_source(name, section, tmp_path):
    """What the configs' comments say: `--set SECTION.dataset=DIR --set SECTION.toyworld=null` (the Train tab's
    dataset field does the same edit)."""
    path = CONFIG_DIR / name
    cfg = load_config(path, _cls(path), {f"{section}.dataset": str(tmp_path), f"{section}.toyworld": None})
    assert getattr(cfg, section).dataset == str(tmp_path) and getattr(cfg, section).toyworld is None
    edited = tt.apply_fields(_raw(path), dataset=tmp_path)
    assert edited[section]["dataset"] == str(tmp_path.resolve()) and "toyworld" not in edited[section]


def test_the_toy_rows_train_on_the_bare_shipped_base():
    """`model.name: toy` in a training config loads multicrafter/assets/toy without its default adapter."""
    from multicrafter.adapters import has_adapter
    from train.run_setup import build_model

    pipe = build_model("toy")
    assert pipe.adapter_name is None and not has_adapter(pipe.transformer)
    assert not any(p.requires_grad for p in pipe.transformer.parameters())


@pytest.mark.parametrize("name,module", [("flux_dev_adapter.yaml", "train.pretrain"), ("flux_dev_ippo.yaml", "train.ippo"),
                                         ("flux_dev_adapter_24gb.yaml", "train.pretrain"),
                                         ("flux_dev_ippo_24gb.yaml", "train.ippo")])
def test_a_flux_config_without_its_data_refuses_with_one_line_before_writing(name, module, tmp_path, monkeypatch,
                                                                            run_main):
    """Run in this process through run_cli (the real-subprocess one-line exits of both commands are in
    test_pretrain.py and test_ippo_train.py), from a folder without the configs' data."""
    import importlib

    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    try:
        res = run_main(importlib.import_module(module).main, ["--config", CONFIG_DIR / name, "--output-dir", out])
    finally:
        # the run set up accelerate's process-wide state in bf16; later runs in this process set up their own
        AcceleratorState._reset_state(reset_partial_state=True)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code != 0 and len(lines) == 1 and lines[0].startswith("error:"), res.err[-2000:]
    assert "Traceback" not in res.err and not out.exists()   # nothing written, not even the folder


def test_toy_rows_share_the_base_budget_and_timesteps():
    """The ablation's rows differ only in what they add (docs/toy_model.md): same steps, seed, schedule and
    timesteps."""
    rows = {n: load_config(CONFIG_DIR / f"toy_adapter_{n}.yaml", PretrainConfig)
            for n in ("baseline", "attn", "attn_moe")}
    for name, cfg in rows.items():
        assert (cfg.train.max_steps, cfg.train.seed, cfg.data.batch_size) == (2000, 0, 16), name
        assert (cfg.train.timesteps.scheme, cfg.train.timesteps.shift) == ("shifted", 8.0), name
        assert cfg.optim.lr == rows["baseline"].optim.lr, name
        assert cfg.model.name == "toy", name
    assert rows["baseline"].attention_loss.weight == 0 and rows["attn"].attention_loss.weight == 0.1
    assert rows["attn_moe"].attention_loss.weight == 0.1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("name,cls,differ", [
    ("flux_dev_adapter", PretrainConfig,
     {"model.quantize", "adapter.lora_rank", "adapter.lora_alpha", "adapter.moe.rank", "adapter.moe.alpha",
      "train.gradient_accumulation_steps", "output.output_dir"}),
    ("flux_dev_ippo", IPPOConfig,
     {"model.quantize", "model.adapter", "sampling.micro_batch", "train.groups_per_step", "train.output_dir"}),
])
def test_the_24gb_configs_are_the_full_recipe_but_for_what_their_header_names(name, cls, differ):
    from train.config import config_to_dict

    full = _flat(config_to_dict(load_config(CONFIG_DIR / f"{name}.yaml", cls)))
    small = _flat(config_to_dict(load_config(CONFIG_DIR / f"{name}_24gb.yaml", cls)))
    assert {k for k in full.keys() | small.keys() if full.get(k) != small.get(k)} == differ
    assert small["model.quantize"] == "nf4" and small["model.gradient_checkpointing"] is True
