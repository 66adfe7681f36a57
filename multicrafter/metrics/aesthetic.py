"""AES: the LAION aesthetic predictor v2 ("improved aesthetic predictor") on CLIP ViT-L/14 image embeddings.

The predictor is a small head (an MLP 768→1024→128→64→16→1 with dropout and no activations, or a single linear
layer) applied to the L2-normalised projected CLIP ViT-L/14 image embedding. Its output is on the AVA/LAION rating
scale (roughly 1–10; ~5 ordinary photos, >6 "aesthetic"). Head weights load from a local .pth/.safetensors file or
from a hub repo + filename; the default is the copy TRL's DDPO example uses (`trl-lib/ddpo-aesthetic-predictor`,
`aesthetic-model.pth` = LAION's sac+logos+ava1-l14-linearMSE.pth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from .clip import ClipScorer
from .defaults import DEFAULT_AES_CLIP, DEFAULT_AES_FILE, DEFAULT_AES_HEAD
from .loading import ModelUnavailable, resolve_file

__all__ = ["DEFAULT_AES_CLIP", "DEFAULT_AES_FILE", "DEFAULT_AES_HEAD", "AestheticHead", "AestheticScorer", "load_head"]


class AestheticHead(nn.Module):
    """A stack of Linear layers (dropout in between is a no-op in eval), built from the checkpoint's own shapes."""

    def __init__(self, dims: Sequence[int], prefix: str = "layers") -> None:
        super().__init__()
        self.prefix = prefix
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> AestheticHead:
        """Accept LAION's `layers.{0,2,4,6,7}.weight` MLP or a bare `weight`/`bias` linear head."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        weights = sorted((k for k in state if k.endswith("weight")), key=_layer_index)
        if not weights or any(state[k].ndim != 2 for k in weights):
            raise ValueError("not an aesthetic head: expected Linear weight matrices")
        dims = [int(state[weights[0]].shape[1])] + [int(state[k].shape[0]) for k in weights]
        if dims[-1] != 1:
            raise ValueError(f"aesthetic head must output one score, got {dims[-1]}")
        head = cls(dims)
        for lin, key in zip(head.linears, weights):
            lin.weight.data.copy_(state[key])
            lin.bias.data.copy_(state[key[: -len("weight")] + "bias"])
        return head.eval()

    @property
    def in_features(self) -> int:
        """Width of the CLIP image embedding the head expects."""
        return self.linears[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) embeddings -> (B,) aesthetic scores."""
        for lin in self.linears:
            x = lin(x)
        return x.squeeze(-1)


def _layer_index(key: str) -> int:
    parts = [p for p in key.split(".") if p.isdigit()]
    return int(parts[-1]) if parts else -1


def load_head(path: str | Path) -> AestheticHead:
    """Read a .pth (state dict, weights_only) or .safetensors head file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        return AestheticHead.from_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch.load/safetensors raise many types for a bad file
        raise ModelUnavailable(f"aesthetic head {path.name} is unreadable ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:120]})") from None


class AestheticScorer:
    """AES(image) = head(normalise(CLIP image embedding))."""

    def __init__(self, clip: ClipScorer, head: AestheticHead) -> None:
        if clip.dim != head.in_features:
            raise ValueError(f"aesthetic head expects {head.in_features}-d CLIP embeddings, the CLIP model gives "
                             f"{clip.dim}-d (the LAION head needs CLIP ViT-L/14)")
        self.clip = clip
        self.head = head.eval()

    @classmethod
    def load(cls, clip: str | ClipScorer = DEFAULT_AES_CLIP, head: str = DEFAULT_AES_HEAD,
             head_filename: str = DEFAULT_AES_FILE, device: str | torch.device = "cpu",
             options: tuple[str, str] = ("--aes-clip", "--aes-head")) -> AestheticScorer:
        """Load the CLIP backbone (id, folder, or an already loaded ClipScorer) and the head (file, folder, hub id);
        `options` name the settings a missing model's message tells the user to set (backbone, head)."""
        head_mod = load_head(resolve_file(head, head_filename, "aesthetic head", options[1]))
        if not isinstance(clip, ClipScorer):
            clip = ClipScorer.load(clip, device=device, option=options[0], load_tokenizer=False)
        return cls(clip, head_mod)

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """One aesthetic score per image (LAION rating scale)."""
        if not images:
            return []
        emb = self.clip.image_embeddings(images)  # already L2-normalised, as the head was trained
        return self.head(emb).tolist()
