"""Reference conditioning (as UNO): resize each reference, VAE-encode, pack 2x2, and give it diagonal position ids.

The image stream the transformer sees is [target tokens | ref 1 tokens | ... | ref N tokens]. Reference k's position
ids are (0, y + H_t + sum of earlier h, x + W_t + sum of earlier w) in packed-token units, so references sit
diagonally past the target and past each other and never share a RoPE position with the target (UNO's "UnoPE").
Only the target tokens are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .io import load_image
from .ref_timestep import find_ref_timestep

MAX_REFERENCES = 4


@dataclass
class ReferenceOptions:
    """How references are prepared. Defaults follow UNO: long side 512 for one reference, 320 for several."""

    max_references: int = MAX_REFERENCES
    long_side_single: int = 512
    long_side_multi: int = 320
    multiple: int = 16            # sizes are rounded down to a multiple of this (VAE x8 and 2x2 packing)
    style: str = "multicrafter"   # "uno": UNO's exact preprocessing (truncating resize, LANCZOS, centre crop)
    ref_timestep_zero: bool = False  # modulate reference tokens with the t = 0 embedding (MOSAIC); default: shared t

    def __post_init__(self) -> None:
        if self.style not in ("multicrafter", "uno"):
            raise UserError(f"reference style must be 'multicrafter' or 'uno', got {self.style!r}")

    def long_side(self, n: int) -> int:
        """Target long side for each of `n` references."""
        return self.long_side_single if n <= 1 else self.long_side_multi


@dataclass
class PackedReferences:
    """The reference part of the image stream for one batch."""

    latents: torch.Tensor          # (B, sum l_i, C*4)
    ids: torch.Tensor              # (sum l_i, 3)
    lengths: list[int]             # tokens per reference, in order
    grids: list[tuple[int, int]]   # packed (h, w) per reference

    @property
    def num_tokens(self) -> int:
        """Reference tokens in total."""
        return int(sum(self.lengths))


def reference_size(width: int, height: int, long_side: int, multiple: int = 16) -> tuple[int, int]:
    """Scale so the long side is `long_side`, keep aspect, round each side down to `multiple` (at least one)."""
    scale = long_side / max(width, height)
    w = max(multiple, int(round(width * scale)) // multiple * multiple)
    h = max(multiple, int(round(height * scale)) // multiple * multiple)
    return w, h


def uno_preprocess(image: Image.Image, long_side: int) -> Image.Image:
    """UNO's reference preprocessing: long side to `long_side` (sizes truncated), LANCZOS, centre-crop to x16."""
    w, h = image.size
    if w >= h:
        new_w, new_h = long_side, int(long_side / w * h)
    else:
        new_w, new_h = int(long_side / h * w), long_side
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    tw, th = new_w // 16 * 16, new_h // 16 * 16
    left, top = (new_w - tw) // 2, (new_h - th) // 2
    return image.crop((left, top, left + tw, top + th))


def prepare_reference_images(images: Sequence[Any], options: ReferenceOptions | None = None) -> list[Image.Image]:
    """Load (path, PIL or numpy), convert to RGB and resize each reference by the options' rule."""
    options = options or ReferenceOptions()
    images = list(images or [])
    if len(images) > options.max_references:
        raise UserError(f"too many reference images: {len(images)} (at most {options.max_references})")
    out = []
    long_side = options.long_side(len(images))
    for i, src in enumerate(images):
        try:
            img = load_image(src, "RGB")
        except UserError as exc:
            raise UserError(f"reference {i + 1}: {exc}") from None
        if min(img.size) < 8:
            raise UserError(f"reference {i + 1} is too small ({img.width}x{img.height})")
        if options.style == "uno":
            img = uno_preprocess(img, long_side)
            if min(img.size) < 16:
                raise UserError(f"reference {i + 1} is too narrow for UNO's preprocessing ({img.width}x{img.height})")
            out.append(img)
            continue
        w, h = reference_size(img.width, img.height, long_side, options.multiple)
        out.append(img.resize((w, h), Image.BICUBIC) if (w, h) != img.size else img)
    return out


def target_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Packed target token grid (rows, cols): each packed token covers 2x2 latent pixels."""
    return height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)


def reference_position_ids(target_hw: tuple[int, int], ref_hws: Sequence[tuple[int, int]]) -> torch.Tensor:
    """UnoPE ids for all references, concatenated: (sum h_k*w_k, 3), in packed-token units."""
    off_h, off_w = target_hw
    parts = []
    for h, w in ref_hws:
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None] + off_h
        ids[..., 2] = torch.arange(w)[None, :] + off_w
        parts.append(ids.reshape(h * w, 3))
        off_h, off_w = off_h + h, off_w + w
    return torch.cat(parts) if parts else torch.zeros(0, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1], the VAE's input range."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@torch.no_grad()
def encode_image(vae: torch.nn.Module, image: Image.Image, device: torch.device | str,
                 generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """PIL image -> normalised VAE latents (1, C, h, w): the posterior's mode (or a sample), FLUX's shift and scale."""
    dist = vae.encode(image_to_tensor(image).to(device=device, dtype=vae.dtype)).latent_dist
    return normalise_latents(vae, dist.sample(generator) if sample else dist.mode())


def normalise_latents(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the transformer's latent space (FLUX's shift and scale from the VAE's config)."""
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: Sequence[Image.Image], device: torch.device | str,
                  batch_size: int = 32) -> list[torch.Tensor]:
    """Posterior modes of many images, normalised as `encode_image`, one (1, C, h, w) each: same-size images share a
    VAE call (a training set's cache pass encodes thousands of images; on a GPU one call each is launch overhead)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, im in enumerate(images):
        by_size.setdefault(im.size, []).append(k)
    for idx in by_size.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            x = torch.cat([image_to_tensor(images[k]) for k in chunk]).to(device=device, dtype=vae.dtype)
            z = normalise_latents(vae, vae.encode(x).latent_dist.mode())
            for k, zk in zip(chunk, z):
                out[k] = zk[None]
    return out  # type: ignore[return-value]


def pack_references(latents: Sequence[torch.Tensor], target_hw: tuple[int, int], batch_size: int,
                    device: torch.device | str, dtype: torch.dtype) -> PackedReferences:
    """Normalised reference latents (1, C, h, w each) -> the packed reference stream with its UnoPE ids."""
    packed = [pack_latents(z.to(dtype)) for z in latents]
    grids = [(z.shape[2] // 2, z.shape[3] // 2) for z in latents]
    if packed:
        cat = torch.cat(packed, dim=1).expand(batch_size, -1, -1)
    else:
        cat = torch.zeros(batch_size, 0, 0, device=device, dtype=dtype)
    ids = reference_position_ids(target_hw, grids).to(device=device, dtype=dtype)
    return PackedReferences(latents=cat, ids=ids, lengths=[p.shape[1] for p in packed], grids=grids)


@torch.no_grad()
def encode_references(
    vae: torch.nn.Module,
    images: Sequence[Image.Image],
    target_hw: tuple[int, int],
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    sample: bool = False,
) -> PackedReferences:
    """VAE-encode prepared references, normalise, pack, give ids.

    We encode each reference with the mode of the VAE posterior (deterministic: the same reference gives the same
    tokens in every call); UNO encodes with a sample of the posterior (`sample=True` does that here). A reference with
    transparency is composited onto white when loaded (`io.load_image`), where UNO drops the alpha channel
    (`convert("RGB")`, so transparent pixels keep whatever colour they store).
    """
    latents = [encode_image(vae, img, device, generator if sample else None, sample) for img in images]
    return pack_references(latents, target_hw, batch_size, device, dtype)


def join_references(hidden_states: torch.Tensor, img_ids: torch.Tensor, refs: PackedReferences | None):
    """Append reference tokens after the target tokens: the image stream becomes [target | ref_1 | ... | ref_N]."""
    if refs is None or refs.num_tokens == 0:
        return hidden_states, img_ids
    ref_latents = refs.latents.to(hidden_states.dtype)
    if ref_latents.shape[0] != hidden_states.shape[0]:
        ref_latents = ref_latents[:1].expand(hidden_states.shape[0], -1, -1)
    return torch.cat([hidden_states, ref_latents], dim=1), torch.cat([img_ids, refs.ids.to(img_ids.dtype)], dim=0)


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    latent_ids: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    refs: PackedReferences | None = None,
    guidance: torch.Tensor | None = None,
    capture: Any = None,
) -> torch.Tensor:
    """One transformer call on [target | references]; returns the velocity for the target tokens only.

    The single place where training (flow matching, IPPO) calls the model: sigma is the noise level in [0, 1]
    (FLUX multiplies by 1000 inside), `capture` (an AttentionCapture) gets the sequence layout when given.
    """
    n_target = latents.shape[1]
    hidden, ids = join_references(latents, latent_ids, refs)
    base = getattr(transformer, "module", transformer)  # DDP / accelerate wrappers keep the model in .module
    ref_t0 = find_ref_timestep(base)
    if ref_t0 is not None:  # installed by the trainer when the config asks for references at t = 0
        ref_t0.n_ref = refs.num_tokens if refs is not None else 0
    if capture is not None:
        # attention imports diffusers' attention processors; references stays light for the app's inputs and presets
        from .attention import CaptureLayout

        capture.layout = CaptureLayout(prompt_embeds.shape[1], n_target, list(refs.lengths) if refs else [])
    if guidance is None and getattr(getattr(base, "config", None), "guidance_embeds", False):
        guidance = torch.full((latents.shape[0],), 1.0, device=latents.device, dtype=torch.float32)
    out = transformer(
        hidden_states=hidden, timestep=sigma.expand(latents.shape[0]).to(latents.dtype), guidance=guidance,
        pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
        img_ids=ids, return_dict=False,
    )[0]
    return out[:, :n_target]
