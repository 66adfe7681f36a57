"""Adapters by Hub id (from a local Hugging Face cache, offline), UNO LoRAs converted once and cached, and the
resolution order: named adapter, then local path, then Hub id."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_convert_uno import uno_checkpoint

from multicrafter import MultiCrafterPipeline, adapter_sources, convert_uno
from multicrafter.adapter_sources import parse_hub_id, resolve_adapter
from multicrafter.adapters import CONFIG_FILE, LORA_FILE, AdapterConfig, add_adapter, save_adapter
from multicrafter.errors import UserError
from multicrafter.presets import build_tiny_components
from tests.hub_cache import REVISION, place_in_hub_cache, use_hub_cache

REPO = "someone/any-name-at-all"   # the repository's name says nothing about its format: the keys do


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache and an empty conversion cache, both under tmp_path."""
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(adapter_sources.CACHE_ENV, str(tmp_path / "converted"))
    return cache


def uno_repo_folder(tmp_path: Path, name: str = "weights.safetensors") -> Path:
    folder = tmp_path / "uno_src"
    folder.mkdir(exist_ok=True)
    save_file(uno_checkpoint(), folder / name)
    (folder / "README.md").write_text("a UNO LoRA for the tiny model")
    return folder


def one_line(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_uno_lora_by_hub_id_converts_once_and_generates(hub, tmp_path, monkeypatch):
    place_in_hub_cache(hub, REPO, uno_repo_folder(tmp_path))
    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "a.png")
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               **{adapter_sources.CACHE_ENV: str(tmp_path / "converted")})
    run = subprocess.run([sys.executable, "-m", "multicrafter.generate", "--model", "tiny", "--adapter", REPO,
                          "--ref", str(tmp_path / "a.png"), "--prompt", "a red block", "--out", str(tmp_path / "o.png"),
                          "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("converting UNO LoRA") == 1 and (tmp_path / "o.png").is_file()
    cached = list((tmp_path / "converted").iterdir())
    assert len(cached) == 1 and (cached[0] / CONFIG_FILE).is_file() and (cached[0] / LORA_FILE).is_file()
    assert '"schedule": "uno"' in run.stdout   # the generation record carries UNO's schedule

    # The second load reads the cached conversion: the converter must not run again.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(convert_uno, "convert", no_conversion)
    pipe = MultiCrafterPipeline.from_pretrained("tiny", adapter=REPO)
    assert pipe.adapter_name == REPO and pipe.reference_options.style == "uno"
    assert pipe.sampling_defaults["schedule"] == "uno"
    assert list((tmp_path / "converted").iterdir()) == cached
    cfg = AdapterConfig.from_dict(__import__("json").loads((cached[0] / CONFIG_FILE).read_text()))
    assert cfg.extra["converted_from"] == f"{REPO}@{REVISION[:12]}/weights.safetensors"


def test_subfolder_file_and_revision_forms(hub, tmp_path, monkeypatch):
    # A MultiCrafter adapter folder in a subfolder, a UNO file named explicitly, a plain diffusers LoRA file.
    t = build_tiny_components()["transformer"]
    add_adapter(t, AdapterConfig(lora_rank=2, lora_alpha=2.0))
    repo = tmp_path / "repo"
    save_adapter(t, repo / "adapters" / "mine")
    save_file(uno_checkpoint(), repo / "uno_a.safetensors")
    save_file(uno_checkpoint(seed=1), repo / "uno_b.safetensors")
    (repo / "loras").mkdir()
    (repo / "loras" / "style.safetensors").write_bytes((repo / "adapters" / "mine" / LORA_FILE).read_bytes())
    snapshot = place_in_hub_cache(hub, REPO, repo)
    base = build_tiny_components()["transformer"]

    assert resolve_adapter(f"{REPO}/adapters/mine", base) == snapshot / "adapters" / "mine"
    assert resolve_adapter(f"{REPO}@{REVISION}/adapters/mine", base) == snapshot / "adapters" / "mine"
    a = resolve_adapter(f"{REPO}/uno_a.safetensors", base)
    b = resolve_adapter(f"{REPO}@main/uno_b.safetensors", base)
    assert a != b and (a / CONFIG_FILE).is_file() and (b / CONFIG_FILE).is_file()
    style = resolve_adapter(f"{REPO}/loras/style.safetensors", base)
    assert (style / LORA_FILE).resolve() == (snapshot / "loras" / "style.safetensors").resolve()
    pipe = MultiCrafterPipeline.from_pretrained("tiny", adapter=f"{REPO}/loras/style.safetensors")
    assert pipe.adapter_name == f"{REPO}/loras/style.safetensors" and "schedule" not in pipe.sampling_defaults
    # Two LoRA files at the root: the user must say which.
    one_line(lambda: resolve_adapter(REPO, base), "several LoRA files")
    # A folder whose one LoRA file has another name: diffusers' format loads as is.
    assert (resolve_adapter(f"{REPO}/loras", base) / LORA_FILE).resolve() == style.joinpath(LORA_FILE).resolve()


def test_offline_and_missing_is_one_line_saying_what_to_download(hub):
    msg = one_line(lambda: resolve_adapter("nobody/not-downloaded", None), "not in the local Hugging Face cache")
    assert msg == ("adapter nobody/not-downloaded is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: run "
                   "once online or `hf download nobody/not-downloaded`, or pass a local folder")
    one_line(lambda: resolve_adapter("./no/such/folder", None), "not found")
    one_line(lambda: resolve_adapter("ipppo", None, model_dir=None), "not found")


def test_resolution_order_named_then_local_then_hub(hub, tmp_path, monkeypatch):
    t = build_tiny_components()["transformer"]
    add_adapter(t, AdapterConfig(lora_rank=2, lora_alpha=2.0))
    model = tmp_path / "model"
    save_adapter(t, model / "adapters" / "ippo")
    monkeypatch.chdir(tmp_path)
    save_adapter(t, tmp_path / "ippo")                       # a local folder named like the model's adapter
    assert resolve_adapter("ippo", t, model) == model / "adapters" / "ippo"
    assert resolve_adapter("ippo", t, None) == Path("ippo")
    save_adapter(t, tmp_path / "someone" / "local")          # a local folder that looks like a Hub id
    place_in_hub_cache(hub, "someone/local", uno_repo_folder(tmp_path))
    assert resolve_adapter("someone/local", t, model) == Path("someone/local")
    # A local UNO file converts (once) as well.
    local_uno = uno_repo_folder(tmp_path) / "weights.safetensors"
    first = resolve_adapter(str(local_uno), t)
    assert resolve_adapter(str(local_uno), t) == first and len(list((tmp_path / "converted").iterdir())) == 1


def test_parse_hub_id():
    assert parse_hub_id("a/b") == ("a/b", None, "")
    assert parse_hub_id("a/b@v1.0/sub/x.safetensors") == ("a/b", "v1.0", "sub/x.safetensors")
    assert parse_hub_id("a/b/sub") == ("a/b", None, "sub")
    for bad in ("a", "./a/b", "/abs/path", "a/../b", "a//b", "a b/c"):
        assert parse_hub_id(bad) is None, bad


# ------------------------------------------------------------------------------------------------ UNO's schedule


def uno_formula(steps: int, height: int, width: int) -> list[float]:
    """UNO's get_schedule written out: t = linspace(1, 0, steps + 1); mu linear in (W/8)(H/8)/256 between
    (256, 0.5) and (4096, 1.15); t' = e^mu / (e^mu + 1/t - 1); the terminal 0 dropped."""
    import math

    n = (width // 8) * (height // 8) // 256
    mu = 0.5 + (n - 256) * (1.15 - 0.5) / (4096 - 256)
    ts = [1 - i / steps for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


def flux_formula(steps: int, height: int, width: int) -> list[float]:
    """FluxPipeline's: linspace(1, 1/steps, steps) shifted with mu from the packed token count (H/16)(W/16)."""
    import math

    n = (height // 16) * (width // 16)
    mu = 0.5 + (n - 256) * (1.15 - 0.5) / (4096 - 256)
    ts = [1 - i * (1 - 1 / steps) / (steps - 1) for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


def sigmas_used(pipe, **kwargs) -> torch.Tensor:
    """The scheduler's sigmas in the call's first step (then the remaining steps are skipped)."""
    seen = {}

    def grab(p, i, t, kw):
        seen["sigmas"] = p.scheduler.sigmas.clone()
        p._interrupt = True
        return {}

    pipe("a", max_sequence_length=8, output_type="latent", callback_on_step_end=grab, **kwargs)
    return seen["sigmas"]


@pytest.fixture(scope="module")
def uno_pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uno")
    save_file(uno_checkpoint(), tmp / "dit_lora.safetensors")
    out = convert_uno.convert(tmp / "dit_lora.safetensors", tmp / "adapter", build_tiny_components()["transformer"])
    return MultiCrafterPipeline.from_pretrained("tiny", adapter=str(out))


@pytest.mark.parametrize("size,middle", [(512, 0.632), (1024, 0.634)])
def test_uno_adapter_samples_on_unos_schedule(uno_pipe, size, middle):
    assert uno_pipe.sampling_defaults["schedule"] == "uno"
    sigmas = sigmas_used(uno_pipe, height=size, width=size)          # 25 steps: the adapter's default
    expected = torch.tensor(uno_formula(25, size, size) + [0.0])
    assert sigmas.shape == (26,) and torch.allclose(sigmas, expected, atol=1e-6)
    assert round(float(sigmas[12]), 3) == middle
    # Overridden by the caller: FluxPipeline's schedule, or the caller's own sigmas (shifted as FluxPipeline does).
    flux = sigmas_used(uno_pipe, height=size, width=size, schedule="flux")
    assert torch.allclose(flux[:-1], torch.tensor(flux_formula(25, size, size)), atol=1e-6)
    own = sigmas_used(uno_pipe, height=size, width=size, num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25])
    assert own.shape == (5,) and not torch.allclose(own[:-1], torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert uno_pipe.scheduler.config.use_dynamic_shifting   # the pipeline's own scheduler is left as it was


@pytest.mark.parametrize("size,middle", [(512, 0.670), (1024, 0.774)])
def test_default_flux_schedule_is_unchanged(size, middle):
    pipe = MultiCrafterPipeline.from_pretrained("tiny")
    sigmas = sigmas_used(pipe, height=size, width=size, num_inference_steps=25)
    assert torch.allclose(sigmas[:-1], torch.tensor(flux_formula(25, size, size)), atol=1e-6)
    assert round(float(sigmas[12]), 3) == middle
    one_line(lambda: pipe("a", height=32, width=32, schedule="karras"), "schedule must be one of")


def test_app_adapter_field_takes_a_hub_id(hub, tmp_path):
    from demo.state import FOLDER_ADAPTER, ModelHolder

    place_in_hub_cache(hub, REPO, uno_repo_folder(tmp_path))
    holder = ModelHolder("tiny", adapter=REPO)   # --adapter / MULTICRAFTER_ADAPTER
    assert holder.default_adapter() == FOLDER_ADAPTER
    with holder.session(FOLDER_ADAPTER, REPO) as (pipe, on, label):
        assert on and label == REPO and pipe.adapter_name == REPO and pipe.sampling_defaults["schedule"] == "uno"
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1: run once online or `hf download nobody/x`"):
        with holder.session(FOLDER_ADAPTER, "nobody/x"):
            pass
