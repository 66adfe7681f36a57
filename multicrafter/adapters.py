"""The MultiCrafter adapter: a peft LoRA on the attention projections plus an optional MoE-LoRA on FFN linears.

An adapter directory holds
  - `pytorch_lora_weights.safetensors`: the LoRA exactly as `FluxPipeline.save_lora_weights` writes it (keys
    `transformer.<module>.lora_A.weight`, peft config in the file metadata), so stock `FluxPipeline.load_lora_weights`
    reads it;
  - `moe_lora.safetensors` (only with MoE-LoRA): `moe_state_dict` of the transformer;
  - `adapter_config.json`: `AdapterConfig.to_dict()`.
A folder holding only a diffusers LoRA file loads too (rank and alpha come from the file). Saving is atomic at the
folder level: everything is written to a temporary sibling folder that then replaces the target.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import safetensors.torch  # save_file/load_file looked up at call time, where a crash test replaces them
import torch
from diffusers.loaders import FluxLoraLoaderMixin
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from .errors import UserError, one_line
from .io import staged_dir
from .moe_lora import (
    MoELoRAConfig,
    MoELoRALinear,
    default_target_regex,
    inject_moe_lora,
    load_moe_state_dict,
    moe_modules,
    moe_parameters,
    moe_state_dict,
    remove_moe_lora,
    set_merged_experts,
    set_moe_enabled,
)

ADAPTER_NAME = "multicrafter"
LORA_FILE = "pytorch_lora_weights.safetensors"
MOE_FILE = "moe_lora.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "multicrafter-adapter"
FORMAT_VERSION = 1
_STATE_ATTR = "_multicrafter_adapter"  # (adapter_name, AdapterConfig) kept on the transformer
_FUSE_ATTR = "_multicrafter_fused"      # {module name: original base weight (CPU)} while the LoRA is fused
_FUSE_WANTED_ATTR = "_multicrafter_fuse_wanted"  # fused before a switch-off: fuse again on switch-on

# Attention projections of the double blocks (image and text streams) and the single blocks, anchored so that
# nothing outside the blocks is touched.
DEFAULT_LORA_TARGETS = (
    r"^(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))$"
)
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class AdapterConfig:
    """What an adapter is made of. `lora_targets`: a regex (full match over module names) or a list of names (peft
    suffix matching: a bare `proj_out` also hits the top-level output projection). `lora_rank=0`: MoE-LoRA only."""

    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: str | list[str] = DEFAULT_LORA_TARGETS
    moe: MoELoRAConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, JSON-serialisable (e.g. reference options)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoELoRAConfig.from_dict(self.moe)
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UserError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if isinstance(self.lora_targets, tuple):
            self.lora_targets = list(self.lora_targets)
        if isinstance(self.lora_targets, str):
            try:
                re.compile(self.lora_targets)
            except re.error as exc:
                raise UserError(f"lora_targets is not a valid regex: {exc}") from None
        elif not (isinstance(self.lora_targets, list) and all(isinstance(t, str) for t in self.lora_targets)):
            raise UserError(f"lora_targets must be a regex string or a list of module names, got {self.lora_targets!r}")
        if self.lora_rank == 0 and self.moe is None:
            raise UserError("an adapter needs lora_rank > 0 or a moe section")
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a mapping, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json holds it (with format and version)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "lora_targets": self.lora_targets,
                "moe": self.moe.to_dict() if self.moe else None, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Read adapter_config.json's content, refusing other formats and unknown keys with a UserError."""
        if not isinstance(data, dict):
            raise UserError(f"adapter config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt, version = data.pop("format", FORMAT), data.pop("version", FORMAT_VERSION)
        if fmt != FORMAT or version != FORMAT_VERSION:
            raise UserError(f"unsupported adapter config format {fmt!r} version {version!r} "
                            f"(expected {FORMAT!r} version {FORMAT_VERSION})")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown adapter config key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"bad adapter config: {exc}") from None


# ------------------------------------------------------------------------------------------------ state


def adapter_state(transformer: nn.Module) -> tuple[str, AdapterConfig] | None:
    """(adapter name, config) of the adapter added or loaded by this module, or None."""
    return getattr(transformer, _STATE_ATTR, None)


def has_adapter(transformer: nn.Module) -> bool:
    """Whether the transformer carries any adapter (ours, a bare MoE-LoRA or a peft LoRA loaded otherwise)."""
    return adapter_state(transformer) is not None or bool(moe_modules(transformer)) or _peft_loaded(transformer)


def _peft_loaded(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "_hf_peft_config_loaded", False)) and bool(getattr(transformer, "peft_config", {}))


def adapter_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights: peft LoRA A/B and the MoE routers and experts."""
    lora = [p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    return lora + moe_parameters(transformer)


def _only_adapter_trainable(transformer: nn.Module) -> None:
    transformer.requires_grad_(False)
    for p in adapter_parameters(transformer):
        p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------ add / remove


def add_adapter(transformer: nn.Module, cfg: AdapterConfig, adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Add a fresh adapter for training (LoRA B and MoE B at zero: the model is unchanged); return adapted modules.

    Only adapter parameters stay trainable. Refuses a transformer that already has one (call `remove_adapter`).
    """
    if has_adapter(transformer):
        raise UserError("the transformer already has an adapter; remove it first")
    names: list[str] = []
    try:
        if cfg.lora_rank > 0:
            targets = cfg.lora_targets if isinstance(cfg.lora_targets, str) else list(cfg.lora_targets)
            transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                               lora_dropout=0.0, init_lora_weights=True), adapter_name=adapter_name)
            names += _lora_module_names(transformer)
        if cfg.moe is not None:
            names += inject_moe_lora(transformer, cfg.moe)
    except Exception as exc:
        remove_adapter(transformer)
        if isinstance(exc, UserError):
            raise
        raise UserError(f"could not add the adapter: {one_line(exc)}") from None
    setattr(transformer, _STATE_ATTR, (adapter_name, cfg))
    _only_adapter_trainable(transformer)
    return names


def remove_adapter(transformer: nn.Module) -> bool:
    """Take every adapter off (MoE-LoRA and all peft LoRA layers) and restore the plain linears; True if any was on."""
    had = has_adapter(transformer)
    unfuse_lora(transformer)   # peft's unload keeps the base weights as they are: merged deltas must go first
    if hasattr(transformer, _FUSE_WANTED_ATTR):
        delattr(transformer, _FUSE_WANTED_ATTR)
    remove_moe_lora(transformer)
    if getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.unload_lora()
    if hasattr(transformer, _STATE_ATTR):
        delattr(transformer, _STATE_ATTR)
    return had


def set_adapter_enabled(transformer: nn.Module, enabled: bool) -> None:
    """Switch the whole adapter (LoRA and MoE-LoRA) on or off without unloading it.

    A fused LoRA is unfused (the exact base weights restored) before switching off and fused again on switching on,
    so off is exactly the base model and on is the fused (fast) adapter again."""
    if _peft_loaded(transformer):
        wants_fused = bool(getattr(transformer, _FUSE_ATTR, None)) or getattr(transformer, _FUSE_WANTED_ATTR, False)
        if not enabled:
            unfuse_lora(transformer)
            transformer.disable_adapters()
            setattr(transformer, _FUSE_WANTED_ATTR, wants_fused)
        else:
            transformer.enable_adapters()
            if wants_fused:
                fuse_lora(transformer)
    set_moe_enabled(transformer, enabled)


# ------------------------------------------------------------------------------------------------ fuse


def _fusable(layer: LoraLayer) -> bool:
    from .memory import is_quantized_weight

    weight = getattr(layer.get_base_layer(), "weight", None)
    return (isinstance(layer.get_base_layer(), nn.Linear) and weight is not None and weight.device.type != "meta"
            and not is_quantized_weight(weight))


def fuse_lora(transformer: nn.Module) -> int:
    """Merge the active plain-LoRA deltas into their base linears for inference; return how many linears were fused.
    MoE-LoRA stays routed, but may then run each token through its expert's merged weight copy where those copies
    are small (`MoELoRALinear.merge_experts`: on CPU).

    The LoRA matmuls then cost nothing per step. Each merged linear's original weight is kept (on the CPU) so that
    `unfuse_lora` restores it bit for bit. Quantised base weights (torchao, bitsandbytes), offloaded (meta) weights
    and a switched-off adapter are left unfused; training must not fuse (the LoRA weights would stop reaching the
    output through their own path, and IPPO's rollouts must compute exactly what its update recomputes)."""
    set_merged_experts(transformer, True)
    if not _peft_loaded(transformer) or getattr(transformer, _FUSE_ATTR, None):
        return 0
    saved: dict[str, torch.Tensor] = {}
    for name, layer in transformer.named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged or layer.disable_adapters or not _fusable(layer):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            continue
        weight = layer.get_base_layer().weight
        saved[name] = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            layer.merge(adapter_names=active)
    if saved:
        setattr(transformer, _FUSE_ATTR, saved)
    return len(saved)


def unfuse_lora(transformer: nn.Module) -> bool:
    """Undo `fuse_lora`: put the exact original base weights back; True if anything was fused."""
    set_merged_experts(transformer, False)
    saved: dict[str, torch.Tensor] | None = getattr(transformer, _FUSE_ATTR, None)
    if not saved:
        return False
    with torch.no_grad():
        for name, original in saved.items():
            layer = transformer.get_submodule(name)
            weight = layer.get_base_layer().weight
            weight.data.copy_(original.to(weight.device))
            layer.merged_adapters.clear()
    delattr(transformer, _FUSE_ATTR)
    return True


def lora_fused(transformer: nn.Module) -> bool:
    """Whether the transformer's LoRA is currently merged into its base weights by `fuse_lora`."""
    return bool(getattr(transformer, _FUSE_ATTR, None))


def _lora_module_names(transformer: nn.Module) -> list[str]:
    return [n for n, m in transformer.named_modules() if isinstance(m, LoraLayer)]


# ------------------------------------------------------------------------------------------------ save


def _lora_metadata(transformer: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The peft LoraConfig as JSON-able metadata (lets the stock loader rebuild rank and alpha exactly)."""
    return lora_config_metadata(transformer.peft_config[adapter_name])


def lora_config_metadata(config: Any) -> dict[str, Any]:
    """A peft LoraConfig as the JSON-able metadata diffusers stores beside LoRA weights."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def _is_adapter_dir(p: Path) -> bool:
    return (p / CONFIG_FILE).is_file() or (p / LORA_FILE).is_file()


def save_adapter(transformer: nn.Module, directory: str | os.PathLike, cfg: AdapterConfig | None = None) -> Path:
    """Write the adapter folder atomically (temp sibling, then replace); return its path.

    `cfg` defaults to the config the adapter was added or loaded with; its `extra` must be JSON-serialisable.
    """
    state = adapter_state(transformer)
    if state is None:
        raise UserError("the transformer has no MultiCrafter adapter to save")
    adapter_name, stored = state
    cfg = cfg or stored
    if (cfg.moe is not None) != bool(moe_modules(transformer)):
        raise UserError("the adapter config and the transformer disagree on MoE-LoRA")
    if (cfg.lora_rank > 0) != (adapter_name in getattr(transformer, "peft_config", {})):
        raise UserError("the adapter config and the transformer disagree on LoRA")
    lora_sd = lora_meta = None
    if cfg.lora_rank > 0:
        lora_sd = {k: v.detach().contiguous() for k, v in
                   get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
        lora_meta = _lora_metadata(transformer, adapter_name)
    moe_sd = moe_state_dict(transformer) if cfg.moe is not None else None
    return write_adapter_dir(directory, cfg, lora_sd, lora_meta, moe_sd)


def write_adapter_dir(directory: str | os.PathLike, cfg: AdapterConfig, lora_sd: dict[str, torch.Tensor] | None,
                      lora_meta: dict[str, Any] | None, moe_sd: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter folder from state dicts (peft keys `<module>.lora_A.weight`), atomically: a temp sibling
    folder, fsynced, then swapped in. A non-empty folder that is not an adapter is never replaced."""
    try:
        config_text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise UserError(f"adapter config is not JSON-serialisable: {exc}") from None
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"cannot save the adapter: {target} is a file")
    if target.is_dir() and any(target.iterdir()) and not _is_adapter_dir(target):
        raise UserError(f"refusing to replace {target}: it is not empty and not an adapter folder")
    with staged_dir(target) as tmp:
        if lora_sd:
            FluxLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=lora_sd,
                                                  transformer_lora_adapter_metadata=lora_meta)
        if moe_sd is not None:
            safetensors.torch.save_file(moe_sd, str(tmp / MOE_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        for f in tmp.iterdir():  # the data must be on disk before the folder becomes visible under its name
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return target


# ------------------------------------------------------------------------------------------------ load


def base_linear(transformer: nn.Module, name: str) -> nn.Linear | None:
    """The plain linear at `name`, looking through a loaded peft LoRA or MoE-LoRA wrapper."""
    try:
        mod = transformer.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(mod, MoELoRALinear):
        mod = mod.base
    mod = getattr(mod, "base_layer", mod)
    return mod if isinstance(mod, nn.Linear) else None


def _read_lora(path: Path, transformer: nn.Module) -> tuple[dict[str, torch.Tensor], dict | None, int, float]:
    """Read and check a diffusers LoRA file against the model: (state dict, metadata, rank, alpha)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UserError(f"cannot read {path}: {one_line(exc)}") from None
    if not sd:
        raise UserError(f"{path} holds no weights")
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in sd.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise UserError(f"{path.name}: unsupported key {key!r} (expected transformer.<module>.lora_A/B.weight)")
        shapes.setdefault(m["module"], {})[m["ab"]] = tuple(t.shape)
    ranks = []
    for module, ab in shapes.items():
        lin = base_linear(transformer, module)
        if lin is None:
            raise UserError(f"{path.name}: LoRA for {module}, which is not a linear layer of this model")
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            raise UserError(f"{path.name}: LoRA for {module} needs 2-d lora_A and lora_B weights")
        (ra, fin), (fout, rb) = ab["A"], ab["B"]
        if ra != rb or fin != lin.in_features or fout != lin.out_features:
            raise UserError(f"{path.name}: LoRA shapes for {module} (A {ab['A']}, B {ab['B']}) do not fit the "
                            f"model's {lin.in_features}->{lin.out_features} linear")
        ranks.append(ra)
    meta = None
    if "lora_adapter_metadata" in file_meta:
        try:
            meta = json.loads(file_meta["lora_adapter_metadata"])
        except ValueError:
            raise UserError(f"{path.name}: unreadable LoRA metadata") from None
    rank = Counter(ranks).most_common(1)[0][0]
    alpha = (meta or {}).get("transformer.lora_alpha", rank)
    return sd, meta, rank, float(alpha)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {one_line(exc)}") from None


def _check_moe_weights(transformer: nn.Module, moe: MoELoRAConfig, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Shape check before anything changes, so a bad file leaves the current adapter in place."""
    e, r = moe.num_experts, moe.rank
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.endswith(".router"):
            module, leaf = module[: -len(".router")], "router"
        lin = base_linear(transformer, module)
        if lin is None or leaf not in ("router", "expert_A", "expert_B"):
            raise UserError(f"{path.name}: unexpected MoE-LoRA weight {key}")
        want = {"router": (e, lin.in_features), "expert_A": (e, r, lin.in_features),
                "expert_B": (e, r, lin.out_features)}[leaf]
        if tuple(t.shape) != want:
            raise UserError(f"{path.name}: {key} has shape {tuple(t.shape)}, the model and config need {want}")


def load_adapter(transformer: nn.Module, directory: str | os.PathLike,
                 adapter_name: str = ADAPTER_NAME) -> AdapterConfig:
    """Load an adapter folder onto `transformer`, replacing any adapter it has; return its config.

    Refuses (UserError, one line) a missing folder, a folder with neither `adapter_config.json` nor a LoRA file, and
    weights that do not fit the model; all checks run before the current adapter is touched.
    """
    d = Path(directory).expanduser()
    if not d.exists():
        raise UserError(f"adapter folder not found: {d}")
    if not d.is_dir():
        raise UserError(f"adapter path is not a folder: {d}")
    cfg = AdapterConfig.from_dict(_read_json(d / CONFIG_FILE)) if (d / CONFIG_FILE).is_file() else None
    if cfg is None and not (d / LORA_FILE).is_file():
        raise UserError(f"{d} is not an adapter folder: no {CONFIG_FILE} and no {LORA_FILE}")

    lora = None
    if (d / LORA_FILE).is_file() and (cfg is None or cfg.lora_rank > 0):
        lora = _read_lora(d / LORA_FILE, transformer)
        sd, meta, rank, alpha = lora
        if cfg is None:
            names = sorted({_LORA_KEY.match(k)["module"] for k in sd})
            cfg = AdapterConfig(lora_rank=rank, lora_alpha=alpha,
                                lora_targets="^(" + "|".join(re.escape(n) for n in names) + ")$")
        elif rank != cfg.lora_rank:
            raise UserError(f"{d / LORA_FILE} has LoRA rank {rank}, {CONFIG_FILE} says {cfg.lora_rank}")
        elif meta is None and alpha != cfg.lora_alpha:  # a hand-made folder: take alpha from the config
            names = sorted({_LORA_KEY.match(k)["module"] for k in sd})
            meta = {"transformer.r": rank, "transformer.lora_alpha": cfg.lora_alpha, "transformer.target_modules": names}
            lora = (sd, meta, rank, cfg.lora_alpha)
    elif cfg.lora_rank > 0:
        raise UserError(f"{d} has no {LORA_FILE} but {CONFIG_FILE} asks for a rank-{cfg.lora_rank} LoRA")

    moe_sd = None
    if cfg.moe is not None:
        if not (d / MOE_FILE).is_file():
            raise UserError(f"{d} has no {MOE_FILE} but {CONFIG_FILE} asks for MoE-LoRA")
        try:
            moe_sd = safetensors.torch.load_file(str(d / MOE_FILE))
        except Exception as exc:
            raise UserError(f"cannot read {d / MOE_FILE}: {one_line(exc)}") from None
        _check_moe_weights(transformer, cfg.moe, moe_sd, d / MOE_FILE)

    remove_adapter(transformer)
    try:
        if lora is not None:
            sd, meta, _, _ = lora
            transformer.load_lora_adapter(sd, prefix="transformer", adapter_name=adapter_name, metadata=meta)
        if moe_sd is not None:
            inject_moe_lora(transformer, cfg.moe)
            load_moe_state_dict(transformer, moe_sd)
    except Exception as exc:
        remove_adapter(transformer)
        if isinstance(exc, UserError):
            raise UserError(f"{d}: {exc}") from None
        raise UserError(f"could not load adapter {d}: {one_line(exc)}") from None
    setattr(transformer, _STATE_ATTR, (adapter_name, cfg))
    _only_adapter_trainable(transformer)
    return cfg


__all__ = [
    "ADAPTER_NAME", "AdapterConfig", "CONFIG_FILE", "DEFAULT_LORA_TARGETS", "LORA_FILE", "MOE_FILE",
    "MoELoRAConfig", "adapter_parameters", "adapter_state", "add_adapter", "default_target_regex", "fuse_lora",
    "has_adapter", "load_adapter", "lora_fused", "remove_adapter", "save_adapter", "set_adapter_enabled", "unfuse_lora",
]
