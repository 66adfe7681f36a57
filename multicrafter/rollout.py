"""Mixed ODE/SDE rollouts for IPPO, and the recomputation of their window log-probs under the current policy.

A rollout samples G images per prompt (one group): the prompt is encoded once per group (the pipeline's own
`encode_prompt`), the references once per group (`encode_references`), every step is one `predict_velocity` call (the
model call shared with pre-training and the pipeline's hooks), so an image costs exactly T network evaluations (2T
with true CFG against the empty prompt, `true_cfg_scale` > 1).
Steps outside the MixGRPO window are Euler (ODE) steps; steps inside are Flow-GRPO SDE steps, and only those are
stored: x_t (in the model dtype, exactly what the model saw), x_{t+1} and log pi_old (both fp32).

`window_log_probs` recomputes log pi_theta of the stored transitions through the very same function
(`_window_transition`), in the same micro-batches, dtype and eval mode, so before any update the ratio is exactly 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from .errors import UserError
from .references import PackedReferences, encode_references, predict_velocity, target_grid
from .sde import FlowSchedule, euler_step, flux_schedule, sde_step


@dataclass
class GroupInput:
    """One prompt of a rollout batch: G images share it, its references and its metadata (e.g. a ToyWorld scene)."""

    prompt: str
    references: list[Any] = field(default_factory=list)    # PIL images, paths or arrays
    metadata: dict[str, Any] | None = None


@dataclass
class RolloutOptions:
    """How a rollout samples: steps, size, guidance, SDE noise level `a`, group size and micro-batching."""

    num_steps: int = 16
    height: int = 512
    width: int = 512
    guidance_scale: float = 3.5
    noise_level: float = 0.7            # a in sigma_t = a * sqrt(sigma / (1 - sigma))
    group_size: int = 4                 # G images per prompt
    same_initial_noise: bool = True     # one x_T per group (MixGRPO) or one per image
    micro_batch: int = 0                # images per transformer call (0: the whole group); the update uses the same
    max_sequence_length: int = 512
    # True CFG against the empty prompt, as the pipeline samples a model whose folder asks for it (the toy: 3). Each
    # step then costs two network calls, in the rollout and in the update: the policy is the guided sampler.
    true_cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        unit = 16
        if self.height % unit or self.width % unit or self.height <= 0 or self.width <= 0:
            raise UserError(f"rollout height and width must be positive multiples of {unit}, "
                            f"got {self.height}x{self.width}")
        if self.num_steps < 1 or self.group_size < 1 or self.micro_batch < 0:
            raise UserError("rollout num_steps and group_size must be >= 1 and micro_batch >= 0")
        if self.noise_level < 0:
            raise UserError(f"rollout noise_level must be >= 0, got {self.noise_level}")
        if not self.true_cfg_scale >= 1.0:
            raise UserError(f"rollout true_cfg_scale must be >= 1 (1 = off), got {self.true_cfg_scale}")

    def chunks(self) -> list[slice]:
        """The micro-batches of a group, identical in the rollout and the update (equal batches, equal numerics)."""
        mb = self.micro_batch or self.group_size
        return [slice(i, min(i + mb, self.group_size)) for i in range(0, self.group_size, mb)]


@dataclass
class GroupContext:
    """What the model is conditioned on for one group (computed once, reused by the update)."""

    prompt: str
    prompt_embeds: torch.Tensor         # (1, L, D)
    pooled_prompt_embeds: torch.Tensor  # (1, D)
    text_ids: torch.Tensor              # (L, 3)
    refs: PackedReferences
    references: list[PIL.Image.Image]   # the prepared (resized) reference images
    metadata: dict[str, Any] | None
    negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # empty-prompt (embeds, pooled, ids)


@dataclass
class Rollout:
    """A batch of groups laid out group after group: sample b belongs to group b // group_size."""

    window: list[int]
    schedule: FlowSchedule
    latent_ids: torch.Tensor
    guidance: float
    noise_level: float
    options: RolloutOptions
    groups: list[GroupContext]
    x_t: torch.Tensor          # (B, |S|, N, C), model dtype
    x_next: torch.Tensor       # (B, |S|, N, C), fp32
    log_probs: torch.Tensor    # (B, |S|), fp32: log pi_old
    images: list[PIL.Image.Image]
    final_latents: torch.Tensor  # (B, N, C) packed x_0, model dtype
    network_evals: int         # transformer calls summed over images (T per image, 2T with true CFG)

    @property
    def group_size(self) -> int:
        """Images per prompt (G)."""
        return self.options.group_size

    @property
    def num_images(self) -> int:
        """Images in the rollout (groups x G)."""
        return int(self.final_latents.shape[0])

    def group_slice(self, g: int) -> slice:
        """The rows of group `g` in the per-image tensors."""
        return slice(g * self.group_size, (g + 1) * self.group_size)

    def per_sample(self, attr: str) -> list[Any]:
        """A group attribute repeated for each of its samples (prompt, references, metadata)."""
        return [getattr(ctx, attr) for ctx in self.groups for _ in range(self.group_size)]


# ----------------------------------------------------------------------------------------------- conditioning


@torch.no_grad()
def encode_group(pipe, group: GroupInput, options: RolloutOptions) -> GroupContext:
    """Encode a group's prompt (once) and references (once) on the pipeline's device."""
    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=[group.prompt], prompt_2=None, device=device,
                                                  num_images_per_prompt=1,
                                                  max_sequence_length=options.max_sequence_length)
    negative = pipe.encode_prompt(prompt=[""], prompt_2=None, device=device, num_images_per_prompt=1,
                                  max_sequence_length=options.max_sequence_length) \
        if options.true_cfg_scale > 1 else None
    refs_pil = pipe.prepare_references(group.references)
    grid = target_grid(options.height, options.width, pipe.vae_scale_factor)
    refs = encode_references(pipe.vae, refs_pil, grid, 1, device, pipe.transformer.dtype)
    return GroupContext(prompt=group.prompt, prompt_embeds=embeds, pooled_prompt_embeds=pooled, text_ids=text_ids,
                        refs=refs, references=refs_pil, metadata=group.metadata, negative=negative)


def _velocity(transformer, ctx: GroupContext, latents: torch.Tensor, latent_ids: torch.Tensor,
              schedule: FlowSchedule, i: int, guidance: float, true_cfg: float = 1.0) -> torch.Tensor:
    """The sampler's velocity: the model's, or with true CFG v_neg + s (v - v_neg) (FluxPipeline's rule; the
    references condition both calls, as in the pipeline)."""
    n = latents.shape[0]
    g = torch.full((n,), guidance, device=latents.device, dtype=torch.float32) if _guidance_embeds(transformer) \
        else None
    sigma = schedule.model_sigma(i, latents.dtype).to(latents.device)
    v = predict_velocity(transformer, latents, latent_ids, sigma, ctx.prompt_embeds.expand(n, -1, -1),
                         ctx.pooled_prompt_embeds.expand(n, -1), ctx.text_ids, ctx.refs, guidance=g)
    if true_cfg <= 1:
        return v
    if ctx.negative is None:
        raise UserError("true CFG needs the group encoded with options.true_cfg_scale > 1 (no empty-prompt embeddings)")
    neg_embeds, neg_pooled, neg_ids = ctx.negative
    v_neg = predict_velocity(transformer, latents, latent_ids, sigma, neg_embeds.expand(n, -1, -1),
                             neg_pooled.expand(n, -1), neg_ids, ctx.refs, guidance=g)
    return v_neg + true_cfg * (v - v_neg)


def _guidance_embeds(transformer) -> bool:
    model = getattr(transformer, "module", transformer)   # unwrap DDP
    return bool(getattr(model.config, "guidance_embeds", False))


def _window_transition(transformer, ctx: GroupContext, x_t: torch.Tensor, latent_ids: torch.Tensor,
                       schedule: FlowSchedule, i: int, guidance: float, noise_level: float,
                       x_next: torch.Tensor | None = None, noise: torch.Tensor | None = None, true_cfg: float = 1.0):
    """The one SDE window step used by both the rollout (draws x_next from `noise`) and the update (scores x_next)."""
    v = _velocity(transformer, ctx, x_t, latent_ids, schedule, i, guidance, true_cfg)
    return sde_step(x_t, v, schedule.sigmas[i], schedule.sigmas[i + 1], noise_level, schedule.sigma_cap,
                    prev_sample=x_next, noise=noise)


# ----------------------------------------------------------------------------------------------- rollout


@torch.no_grad()
def rollout(pipe, groups: Sequence[GroupInput | GroupContext], window: Sequence[int], options: RolloutOptions,
            generator: torch.Generator | None = None, decode: bool = True, model: Any = None) -> Rollout:
    """Sample `options.group_size` images per group with SDE steps inside `window` and ODE steps elsewhere.

    `model`: the transformer to call (e.g. the accelerate-prepared one the update also calls); default
    `pipe.transformer`. Noise is drawn on the CPU from `generator` (same images on any device for a given seed)."""
    transformer = model if model is not None else pipe.transformer
    transformer.eval()
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    window = sorted(int(i) for i in window)
    if not window or window[0] < 0 or window[-1] >= options.num_steps:
        raise UserError(f"window steps {window} are not inside 0..{options.num_steps - 1}")
    contexts = [g if isinstance(g, GroupContext) else encode_group(pipe, g, options) for g in groups]
    G = options.group_size
    channels = pipe.transformer.config.in_channels // 4
    x_t_all, x_next_all, logp_all, latents_out = [], [], [], []
    schedule = None
    latent_ids = None
    evals = 0
    for ctx in contexts:
        n_init = 1 if options.same_initial_noise else G
        init, latent_ids = pipe.prepare_latents(n_init, channels, options.height, options.width, torch.float32,
                                                "cpu", generator)
        init = init.expand(G, -1, -1) if n_init == 1 else init
        latent_ids = latent_ids.to(device)
        if schedule is None:
            schedule = flux_schedule(pipe.scheduler, options.num_steps, init.shape[1], device)
        for part in options.chunks():
            x = init[part].to(device=device, dtype=dtype).contiguous()  # never a stride-0 view (exact ratio 1)
            xs, xn, lps = [], [], []
            for i in range(options.num_steps):
                if i in window:
                    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
                    out = _window_transition(transformer, ctx, x, latent_ids, schedule, i, options.guidance_scale,
                                             options.noise_level, noise=noise, true_cfg=options.true_cfg_scale)
                    xs.append(x)
                    xn.append(out.prev_sample)
                    lps.append(out.log_prob)
                    x = out.prev_sample.to(dtype)
                else:
                    v = _velocity(transformer, ctx, x, latent_ids, schedule, i, options.guidance_scale,
                                  options.true_cfg_scale)
                    x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1]).to(dtype)
                evals += x.shape[0] * (2 if options.true_cfg_scale > 1 else 1)
            x_t_all.append(torch.stack(xs, 1))
            x_next_all.append(torch.stack(xn, 1))
            logp_all.append(torch.stack(lps, 1))
            latents_out.append(x)
    final = torch.cat(latents_out)
    images = decode_latents(pipe, final, options.height, options.width) if decode else []
    return Rollout(window=window, schedule=schedule, latent_ids=latent_ids, guidance=options.guidance_scale,
                   noise_level=options.noise_level, options=options, groups=contexts,
                   x_t=torch.cat(x_t_all), x_next=torch.cat(x_next_all), log_probs=torch.cat(logp_all),
                   images=images, final_latents=final, network_evals=evals)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, height: int, width: int) -> list[PIL.Image.Image]:
    """Packed final latents -> PIL images, exactly as FluxPipeline decodes."""
    vae = pipe.vae
    z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    z = (z / vae.config.scaling_factor) + vae.config.shift_factor
    images = []
    for k in range(z.shape[0]):  # one at a time: the VAE decoder dominates memory at 512 px
        img = vae.decode(z[k : k + 1].to(vae.dtype), return_dict=False)[0]
        images.extend(pipe.image_processor.postprocess(img, output_type="pil"))
    return images


# ----------------------------------------------------------------------------------------------- update side


def iter_chunks(ro: Rollout) -> Iterator[tuple[int, slice]]:
    """(group index, sample slice in the batch) for every micro-batch, in rollout order."""
    for g in range(len(ro.groups)):
        base = g * ro.group_size
        for part in ro.options.chunks():
            yield g, slice(base + part.start, base + part.stop)


def window_log_probs(transformer, ro: Rollout, group: int, samples: slice) -> torch.Tensor:
    """log pi_theta (B_chunk, |S|) of the stored window transitions of one micro-batch, with gradients.

    `samples` must be one of `iter_chunks(ro)`'s slices so the batch matches the rollout's."""
    transformer.eval()  # same mode as the rollout: no dropout, no router noise
    ctx = ro.groups[group]
    out = []
    for j, i in enumerate(ro.window):
        # contiguous like the rollout's own tensors: strided inputs can take other (bf16) kernels and change bits
        step = _window_transition(transformer, ctx, ro.x_t[samples, j].contiguous(), ro.latent_ids, ro.schedule, i,
                                  ro.guidance, ro.noise_level, x_next=ro.x_next[samples, j].contiguous(),
                                  true_cfg=ro.options.true_cfg_scale)
        out.append(step.log_prob)
    return torch.stack(out, 1)


__all__ = [
    "GroupContext", "GroupInput", "Rollout", "RolloutOptions", "decode_latents", "encode_group", "iter_chunks",
    "rollout", "window_log_probs",
]
