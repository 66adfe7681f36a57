"""Training data: a dataset folder (`multicrafter.dataset_format`) or a ToyWorld set written on the fly -> batches of
latents, text embeddings, packed references and subject masks on the packed latent grid.

Why this shape: the text encoders and the VAE are frozen, so their outputs can be computed once (`cache: true`), which
is most of a CPU step. Targets are resized (cover + centre crop) to the configured size or to an aspect bucket of the
same area; references follow the pipeline's own rules (`prepare_reference_images` / `ReferenceOptions`), so training
sees exactly what generation feeds. References of one batch must share a layout (their packed grids give the UnoPE
ids), so batches are drawn from groups of samples with the same target size and reference sizes. The order is a pure
function of (seed, epoch), so the data position (epoch, batch) is all a checkpoint needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from multicrafter import dataset_format
from multicrafter.dataset_format import Sample
from multicrafter.errors import UserError
from multicrafter.io import atomic_write_bytes
from multicrafter.losses import masks_to_grid
from multicrafter.references import (
    PackedReferences,
    ReferenceOptions,
    encode_images,
    pack_latents,
    pack_references,
    prepare_reference_images,
    reference_size,
    target_grid,
)
from multicrafter.toyworld import write_dataset
from multicrafter.toyworld.prompts import restyle_prompt

ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
TOYWORLD_SPEC = "toyworld_spec.json"


@dataclass
class ToyWorldSource:
    """A ToyWorld set written once (by `multicrafter.toyworld.write_dataset`) and then read like any dataset folder."""

    n: int = 8                        # number of scenes
    seed: int = 0
    split: str = "train"              # identity split (test identities never appear in train scenes)
    size: int = 64                    # scene size in pixels (multiple of 16)
    ref_size: int = 32                # rendered reference size in pixels
    subjects: list[int] = field(default_factory=lambda: [1, 2])   # subject counts to draw from (1-4)
    similar_prob: float = 0.3         # share of scenes with a deliberately similar pair
    folder: str | None = None         # where to write it; default OUTPUT_DIR/toyworld (reused when the spec matches)

    def __post_init__(self) -> None:
        if self.split != "train":  # the held-out identities are the evaluation's; training on them is a leak
            raise UserError(f"toyworld.split must be 'train' for training data, got {self.split!r}")


@dataclass
class DataConfig:
    dataset: str | None = None        # a dataset folder (multicrafter.dataset_format); exactly one of dataset / toyworld
    toyworld: ToyWorldSource | None = None
    resolution: int = 512             # target side in pixels (multiple of 16); with bucketing: sqrt of the area
    bucketing: bool = False           # aspect-ratio buckets of ~resolution² pixels instead of square crops
    with_references: bool = True      # append each subject's reference (base mode may train text-to-image only)
    max_references: int = 4           # samples with more subjects are refused (line-numbered)
    ref_long_side_single: int | None = None   # reference long side with one subject; None: the model's setting
    ref_long_side_multi: int | None = None    # ... with several subjects (UNO: 512 / 320 on FLUX)
    caption_dropout: float = 0.0      # probability of training a sample on the empty caption
    positions_caption_prob: float = 0.0  # probability of training a sample on its caption with each subject named
                                      # only by position ('an object on the left'): identity must then come from the
                                      # references (ToyWorld captions; toyworld.prompts.restyle_prompt)
    cache: bool = True                # encode text, targets and references once (frozen encoders) and keep them
    cache_dir: str | None = None      # with cache: also keep the encodings in a file here, keyed by the data, the
                                      # encoders' weights and these settings, so a resumed run or a sibling adapter
                                      # run skips the encoding pass (a changed input gives a new file, never a stale one)
    max_sequence_length: int = 512    # T5 tokens
    batch_size: int = 1               # per process and per micro-batch
    num_validation: int = 1           # first samples used for validation images and attention maps

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.toyworld is None):
            raise UserError("data: give exactly one of 'dataset' (a folder) or 'toyworld' (made on the fly)")
        if self.resolution < 16 or self.resolution % 16:
            raise UserError(f"data.resolution must be a positive multiple of 16, got {self.resolution}")
        for name in ("caption_dropout", "positions_caption_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_sequence_length < 1:
            raise UserError("data.batch_size and data.max_sequence_length must be >= 1")


# ------------------------------------------------------------------------------------------------ sources


def ensure_toyworld(src: ToyWorldSource, output_dir: str | Path) -> Path:
    """Write the ToyWorld set (temp folder + rename) unless a folder with the same spec is already there."""
    folder = Path(src.folder) if src.folder else Path(output_dir) / "toyworld"
    spec = json.dumps(asdict(src) | {"folder": None}, sort_keys=True)
    if (folder / "metadata.jsonl").is_file() and (folder / TOYWORLD_SPEC).is_file():
        if (folder / TOYWORLD_SPEC).read_text() == spec:
            return folder
    if folder.exists() and any(folder.iterdir()) and not (folder / TOYWORLD_SPEC).is_file():
        raise UserError(f"toyworld folder {folder} exists and was not written by the trainer; choose another folder")
    write_dataset(folder, src.n, seed=src.seed, split=src.split, size=src.size, ref_size=src.ref_size,
                  overwrite=True, extra_files={TOYWORLD_SPEC: spec}, n_subjects=tuple(src.subjects),
                  similar_prob=src.similar_prob, workers=min(os.cpu_count() or 1, 16))
    return folder


def load_samples(root: str | Path) -> list[Sample]:
    """The dataset's samples, validated up front (line-numbered errors); an empty dataset is refused."""
    root = Path(root)
    samples = dataset_format.load_samples(root)
    if not samples:
        raise UserError(f"dataset {root} is empty: metadata.jsonl lists no samples")
    return samples


def positions_caption(sample: Sample) -> str:
    """The sample's caption with its subjects named by position only; a caption outside ToyWorld's vocabulary is
    refused with its line (the option needs captions whose subjects can be found)."""
    try:
        return restyle_prompt(sample.caption, "positions")
    except ValueError:
        raise UserError(f"metadata.jsonl:{sample.line}: data.positions_caption_prob needs ToyWorld captions "
                        f"('a red-blue striped star on the left, ...'), got {sample.caption[:60]!r}") from None


# ------------------------------------------------------------------------------------------------ geometry


def bucket_size(width: int, height: int, resolution: int, bucketing: bool) -> tuple[int, int]:
    """(W, H) the target is trained at: the square, or the aspect bucket nearest in log-aspect with ~res² pixels."""
    if not bucketing:
        return resolution, resolution
    best = min(ASPECTS, key=lambda a: abs(math.log(a) - math.log(width / height)))
    w = max(16, round(resolution * math.sqrt(best) / 16) * 16)
    h = max(16, round(resolution / math.sqrt(best) / 16) * 16)
    return w, h


def cover_crop(img: Image.Image, size: tuple[int, int], resample: int = Image.BICUBIC) -> Image.Image:
    """Scale to cover `size` (W, H) keeping aspect, then crop the centre; masks use the same call (bilinear)."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((rw, rh), resample) if (rw, rh) != img.size else img
    left, top = (rw - w) // 2, (rh - h) // 2
    return img.crop((left, top, left + w, top + h))


# ------------------------------------------------------------------------------------------------ dataset


@dataclass
class Item:
    """One sample as the trainer sees it (before encoding)."""

    name: str
    caption: str
    size: tuple[int, int]                  # target (W, H)
    image: Path
    refs: list[Path]
    ref_sizes: list[tuple[int, int]]       # prepared reference (W, H)
    masks: Any                             # list of mask paths
    subject_names: list[str]
    line: int
    caption_positions: str | None = None   # the caption with subjects named by position only (positions_caption_prob)

    @property
    def key(self) -> tuple:
        return (self.size, tuple(self.ref_sizes))


class TrainingSet:
    """Samples -> encoded tensors (cached or on the fly), grouped into layout-compatible batches."""

    def __init__(self, samples: list, cfg: DataConfig, ref_options: ReferenceOptions, vae_scale_factor: int,
                 text_trainable: bool = False):
        self.cfg = cfg
        # trained text encoders: captions are encoded in the training step, never here (nor cached)
        self.text_trainable = text_trainable
        self.vae_scale_factor = vae_scale_factor
        self.ref_options = ReferenceOptions(
            max_references=cfg.max_references,
            long_side_single=cfg.ref_long_side_single or ref_options.long_side_single,
            long_side_multi=cfg.ref_long_side_multi or ref_options.long_side_multi,
            multiple=ref_options.multiple, style=ref_options.style)
        self.items: list[Item] = []
        for s in samples:
            n = len(s.subjects)
            if cfg.with_references and n > cfg.max_references:
                raise UserError(f"metadata.jsonl:{s.line}: {n} subjects, more than data.max_references "
                                f"({cfg.max_references})")
            with Image.open(s.image) as im:
                size = bucket_size(im.width, im.height, cfg.resolution, cfg.bucketing)
            refs = [sub.reference for sub in s.subjects] if cfg.with_references else []
            long_side = self.ref_options.long_side(len(refs))
            ref_sizes = []
            for r in refs:
                with Image.open(r) as im:
                    ref_sizes.append(reference_size(im.width, im.height, long_side, self.ref_options.multiple))
            self.items.append(Item(name=s.name, caption=s.caption, size=size, image=s.image, refs=refs,
                                   ref_sizes=ref_sizes, masks=[sub.mask for sub in s.subjects] if refs else [],
                                   subject_names=[sub.name for sub in s.subjects], line=s.line,
                                   caption_positions=positions_caption(s) if cfg.positions_caption_prob else None))
        self._cache: dict[int, dict[str, Any]] = {}
        self._empty_text: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_subjects(self) -> bool:
        return any(it.refs for it in self.items)

    def mask_grid(self, i: int) -> torch.Tensor:
        """(N, h*w) subject masks on the packed latent grid (area fractions), after the target's resize/crop."""
        it = self.items[i]
        grid = target_grid(it.size[1], it.size[0], self.vae_scale_factor)
        if not it.masks:
            return torch.zeros(0, grid[0] * grid[1])
        ms = []
        for p in it.masks:
            with Image.open(p) as m:
                mask = dataset_format.mask_to_image(m)
            small = cover_crop(mask, it.size, Image.BILINEAR)
            ms.append(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0))
        return masks_to_grid(torch.stack(ms)[None], grid)[0]

    # -------------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode(self, i: int, pipe, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
        """Text embeddings, packed target latents (posterior mode), packed references and mask grid of sample i."""
        return self.encode_many([i], pipe, device, dtype)[0]

    @torch.no_grad()
    def encode_many(self, indices: list[int], pipe, device: torch.device | str,
                    dtype: torch.dtype) -> list[dict[str, Any]]:
        """`encode` for many samples at once: one text-encoder call for all captions and one VAE call per image size
        (the same numbers as one sample at a time, up to float rounding). Meant for GPUs, where a call per sample is
        mostly launch overhead; on a CPU it is the same speed (bench/encode_cache.py)."""
        todo = [i for i in dict.fromkeys(indices) if i not in self._cache]
        fresh: dict[int, dict[str, Any]] = {}
        if todo:
            items = [self.items[i] for i in todo]
            embeds = pooled = None
            # positions captions are all or none (positions_caption_prob); they follow the captions in the same call
            with_positions = bool(self.cfg.positions_caption_prob) and not self.text_trainable
            if not self.text_trainable:
                prompts = [it.caption for it in items] + ([it.caption_positions for it in items] if with_positions else [])
                embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                       device=device, max_sequence_length=self.cfg.max_sequence_length)
                embeds, pooled = embeds.to(dtype), pooled.to(dtype)
            targets = [cover_crop(Image.open(it.image).convert("RGB"), it.size) for it in items]
            refs_pil = [prepare_reference_images(it.refs, self.ref_options) if it.refs else [] for it in items]
            zs = encode_images(pipe.vae, targets + [r for rs in refs_pil for r in rs], device)
            z_refs = iter(zs[len(items):])
            for k, (i, it) in enumerate(zip(todo, items)):
                grid = target_grid(it.size[1], it.size[0], self.vae_scale_factor)
                ref_z = [next(z_refs) for _ in refs_pil[k]]
                fresh[i] = {"prompt_embeds": None if embeds is None else embeds[k : k + 1].clone(),
                            "pooled": None if pooled is None else pooled[k : k + 1].clone(),
                            "positions_embeds": None, "positions_pooled": None,
                            "latents": pack_latents(zs[k].to(dtype)),
                            "refs": pack_references(ref_z, grid, 1, device, dtype) if ref_z else None,
                            "masks": self.mask_grid(i).to(device), "grid": grid}
                if with_positions:
                    j = len(items) + k
                    fresh[i]["positions_embeds"] = embeds[j : j + 1].clone()
                    fresh[i]["positions_pooled"] = pooled[j : j + 1].clone()
            if self.cfg.cache:
                self._cache.update(fresh)
        return [self._cache[i] if i in self._cache else fresh[i] for i in indices]

    @torch.no_grad()
    def empty_text(self, pipe, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the empty caption (caption dropout), computed once (None with trained text encoders)."""
        if self._empty_text is None and not self.text_trainable:
            e, p, _ = pipe.encode_prompt(prompt=[""], prompt_2=None, device=device,
                                         max_sequence_length=self.cfg.max_sequence_length)
            self._empty_text = (e.to(dtype), p.to(dtype))
        return self._empty_text

    def precompute(self, pipe, device, dtype, progress: bool = False) -> None:
        if not self.cfg.cache:
            return
        path = self.disk_cache_path(pipe, dtype) if self.cfg.cache_dir else None
        if path is not None and path.is_file():
            try:
                state = torch.load(path, map_location=device, weights_only=False)
                if len(state["items"]) == len(self):
                    self._cache, self._empty_text = dict(enumerate(state["items"])), state["empty_text"]
                    return
            except Exception as exc:  # noqa: BLE001 - a damaged cache is re-encoded, never trusted
                print(f"note: ignoring unreadable encoding cache {path} ({type(exc).__name__}); re-encoding")
        chunk = 64
        with tqdm(total=len(self), desc="encoding dataset", disable=not progress, leave=False) as bar:
            for s in range(0, len(self), chunk):
                self.encode_many(list(range(s, min(s + chunk, len(self)))), pipe, device, dtype)
                bar.update(min(chunk, len(self) - s))
        self.empty_text(pipe, device, dtype)
        if path is not None:
            buf = io.BytesIO()
            torch.save({"items": [self._cache[i] for i in range(len(self))], "empty_text": self._empty_text}, buf)
            atomic_write_bytes(path, buf.getvalue())

    def disk_cache_path(self, pipe, dtype) -> Path:
        """cache_dir/encodings-<key>.pt; the key covers every input of `encode` (files by size and mtime, the
        encoders by a sample of each weight tensor, the tokenizers' sizes, the settings), so any change misses."""
        h = hashlib.sha256()
        settings = {"max_sequence_length": self.cfg.max_sequence_length, "refs": asdict(self.ref_options),
                    "dtype": str(dtype), "vae_scale_factor": self.vae_scale_factor,
                    "vae": {k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")},
                    "tokenizers": [len(t) for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None],
                    "text": "trainable" if self.text_trainable else "frozen"}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for it in self.items:
            h.update(f"{it.caption}|{it.size}|{it.ref_sizes}".encode())
            if it.caption_positions:
                h.update(f"positions|{it.caption_positions}".encode())
            for f in (it.image, *it.refs, *it.masks):
                st = os.stat(f)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        encoders = (pipe.vae,) if self.text_trainable else (pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
        for module in encoders:
            if module is None:
                continue
            for name, t in module.state_dict().items():
                flat = t.detach().flatten().float().cpu()
                h.update(f"{name}|{tuple(t.shape)}".encode())
                h.update(torch.cat([flat[:32], flat[-32:], flat.sum().reshape(1)]).numpy().tobytes())
        return Path(self.cfg.cache_dir) / f"encodings-{h.hexdigest()[:16]}.pt"

    def collate(self, indices: list[int], pipe, device, dtype, generator: torch.Generator) -> dict[str, Any]:
        """A batch of samples with the same layout: latents (B, T, C), embeddings, references, masks (B, N, T).

        Caption dropout draws one uniform per sample from `generator` (always, so the stream does not depend on p);
        positions captions draw a second one, only when enabled (so runs without them keep their stream).
        """
        encs = self.encode_many(list(indices), pipe, device, dtype)
        drop = torch.rand(len(indices), generator=generator) < self.cfg.caption_dropout
        positions = torch.zeros(len(indices), dtype=torch.bool)
        if self.cfg.positions_caption_prob:
            positions = torch.rand(len(indices), generator=generator) < self.cfg.positions_caption_prob
        captions = [self.items[i].caption_positions if q else self.items[i].caption for i, q in zip(indices, positions)]
        embeds = pooled = None  # trained text encoders: the trainer encodes `captions` with `caption_dropped`
        if not self.text_trainable:
            empty = self.empty_text(pipe, device, dtype)
            pick = [empty if d else (e["positions_embeds"], e["positions_pooled"]) if q
                    else (e["prompt_embeds"], e["pooled"]) for e, d, q in zip(encs, drop, positions)]
            embeds, pooled = torch.cat([e for e, _ in pick]), torch.cat([p for _, p in pick])
        refs = None
        if encs[0]["refs"] is not None:
            r0: PackedReferences = encs[0]["refs"]
            refs = PackedReferences(latents=torch.cat([e["refs"].latents for e in encs]), ids=r0.ids,
                                    lengths=list(r0.lengths), grids=list(r0.grids))
        gh, gw = encs[0]["grid"]
        return {"latents": torch.cat([e["latents"] for e in encs]), "prompt_embeds": embeds, "pooled": pooled,
                "refs": refs, "masks": torch.stack([e["masks"] for e in encs]), "grid": (gh, gw),
                "captions": captions, "indices": list(indices), "caption_dropped": drop,
                "positions_caption": positions}


# ------------------------------------------------------------------------------------------------ order


class BatchOrder:
    """Deterministic batches: shuffle by (seed, epoch), group by layout key, split evenly across processes.

    `position` = (epoch, batch index within the epoch); restoring it resumes the exact stream.
    """

    def __init__(self, keys: list[tuple], batch_size: int, seed: int, num_processes: int = 1, rank: int = 0):
        if not keys:
            raise UserError("no training samples")
        self.keys, self.batch_size, self.seed = keys, batch_size, seed
        self.num_processes, self.rank = num_processes, rank
        self.epoch, self.index = 0, 0
        self._batches = self.epoch_batches(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.keys), generator=g).tolist()
        open_: dict[tuple, list[int]] = {}
        batches: list[list[int]] = []
        for i in order:
            group = open_.setdefault(self.keys[i], [])
            group.append(i)
            if len(group) == self.batch_size:
                batches.append(list(group))
                group.clear()
        batches += [g_ for g_ in open_.values() if g_]
        # Every process gets the same number of batches (the last len % P are left out this epoch, other ones the
        # next), so all processes share one (epoch, index) position and rank 0's checkpoint resumes every rank.
        per = len(batches) // self.num_processes
        if per == 0:  # fewer batches than processes: every process still gets one (repeats a batch)
            return [batches[self.rank % len(batches)]]
        return batches[self.rank::self.num_processes][:per]

    def next(self) -> list[int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self.epoch_batches(self.epoch)
