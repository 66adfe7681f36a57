"""Pre-training (the paper's fidelity phase): `python -m train.pretrain --config FILE [--max-steps N] [--output-dir DIR]
[--resume]`.

The recipe, in the order `Trainer` runs it: data (a dataset folder or ToyWorld, encoded once) -> the model with its
adapter (peft LoRA on the attention projections, MoE-LoRA on the output-side FFNs) -> per micro-batch the loss
L = L_diff + λ·L_attn, with L_attn the Dice loss between each subject's captured attention map and its mask ->
optimizer step -> metrics line and checkpoint. With λ = 0 no capture is installed at all, so the run is exactly plain
flow matching. `train.mode: base` instead trains a whole transformer text-to-image (how the toy base is made; the
pieces that build such a base live in `train.toy_base`).

Every model call goes through `multicrafter.references.predict_velocity`. Resuming restores trainable weights,
optimizer, LR schedule, EMA, every RNG and the data position, so on CPU a resumed run logs the same losses as an
uninterrupted one. `--max-steps` stops early (with a checkpoint); the LR schedule keeps `train.max_steps` as horizon.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multicrafter.adapters import (
    DEFAULT_LORA_TARGETS,
    AdapterConfig,
    adapter_parameters,
    add_adapter,
    load_adapter,
    save_adapter,
)
from multicrafter.attention import (
    AttentionCapture,
    chosen_heads,
    install_capture,
    normalize_maps,
    remove_capture,
)
from multicrafter.attention_overlay import save_attention_figure
from multicrafter.errors import UserError, run_cli
from multicrafter.io import save_image_atomic
from multicrafter.losses import flow_matching_loss, noisy_latents, sample_sigmas
from multicrafter.moe_lora import inject_moe_lora, moe_aux_loss, moe_modules
from multicrafter.ref_timestep import find_ref_timestep, install_ref_timestep
from multicrafter.references import ReferenceOptions, predict_velocity
from multicrafter.sde import flux_mu

from . import toy_base
from .checkpoints import (
    capture_rng_state,
    checkpoint_step,
    gather_rng_states,
    load_checkpoint,
    restore_rank_rng_state,
    restore_rng_state,
    save_on_main,
    seed_everything,
)
from .config import config_to_dict, load_config, parse_set_overrides, training_parser
from .data import BatchOrder, TrainingSet, ensure_toyworld, load_samples
from .metrics_log import LogSchedule, MetricsLogger
from .optim import EMA, build_optimizer, grad_norm
from .pretrain_config import ATTENTION_LOSSES, PretrainConfig
from .run_setup import build_model, claim_output_dir, freeze, resume_point, setup_accelerator


def adapter_config(cfg: PretrainConfig, ref_options: ReferenceOptions) -> AdapterConfig:
    """The AdapterConfig the YAML describes (extra records the reference sizes it was trained with)."""
    a = cfg.adapter
    extra = {"reference_sizes": {"long_side_single": ref_options.long_side_single,
                                 "long_side_multi": ref_options.long_side_multi},
             "attention_loss_weight": cfg.attention_loss.weight, "ref_timestep_zero": cfg.model.ref_timestep_zero}
    return AdapterConfig(lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                         lora_targets=a.lora_targets if a.lora_targets is not None else DEFAULT_LORA_TARGETS,
                         moe=dataclasses.replace(a.moe) if a.type == "moe_lora" else None, extra=extra)


class Trainer:
    """Builds data, model, adapter and optimizer from a config; `train_step()` does one optimizer step, `run()` the
    whole loop. Holds the output folder's lock from construction to `close()` (or the end of a `with` block)."""

    def __init__(self, cfg: PretrainConfig, output_dir: str | Path | None = None, resume: bool = False,
                 pipe: Any = None):
        """`pipe`: an already-built MultiCrafterPipeline to train on instead of loading `cfg.model` (benchmarks at
        FLUX size with random weights); it is frozen here like a loaded one."""
        self.cfg = cfg
        self._given_pipe = pipe
        self.output_dir = Path(output_dir or cfg.output.output_dir)
        self.lam = cfg.attention_loss.weight
        self.metrics: MetricsLogger | None = None
        self.accelerator = setup_accelerator(cfg.train)
        self.device = self.accelerator.device
        self.lock = claim_output_dir(self.accelerator, self.output_dir)   # before anything is written there
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: bool) -> None:
        cfg, acc = self.cfg, self.accelerator
        seed_everything(cfg.train.seed)
        self.resumed_from = resume_point(acc, self.output_dir, resume)

        # 1. data: the samples are checked before any model is loaded
        with acc.main_process_first():  # the main process writes a ToyWorld set, the others read it
            root = ensure_toyworld(cfg.data.toyworld, self.output_dir) if cfg.data.toyworld else cfg.data.dataset
            samples = load_samples(root)
        if self.lam > 0 and not any(s.subjects for s in samples):
            raise UserError("attention_loss.weight > 0 needs samples with subjects and masks "
                            "(and data.with_references: true)")

        # 2. the model (frozen), rebuilt in part only when the config builds a base, then what trains
        if self._given_pipe is not None:
            self.pipe = freeze(self._given_pipe)
        else:
            self.pipe = build_model(cfg.model.name, cfg.model.dtype, device=self.device,
                                    quantize=cfg.model.quantize)
        self.pipe.set_progress_bar_config(disable=True)
        if cfg.model.builds_base:
            toy_base.build_base(self.pipe, cfg.model, cfg.train.seed, self.device)
        self.transformer = tr = self.pipe.transformer
        if cfg.model.ref_timestep_zero:
            install_ref_timestep(tr).enabled = True
        self.adapter_cfg: AdapterConfig | None = None
        if cfg.train.mode == "adapter":
            self.adapter_cfg = self._add_adapter()
        else:
            tr.requires_grad_(True)
        # every trainable weight by checkpoint name: the transformer's own names, the text encoders' prefixed
        self.named_params = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        text = toy_base.unfreeze_text_encoders(self.pipe) if cfg.train.train_text_encoders else {}
        self.named_params.update(text)
        self.text_params = list(text.values())
        self.params = list(self.named_params.values())
        for p in self.params:  # trainable weights in fp32 (frozen ones may be bf16/fp16)
            p.data = p.data.float()
        self.dtype = tr.dtype  # dtype of the model inputs: the frozen weights' (all fp32 in base mode)
        if cfg.model.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()

        # 3. the attention maps L_attn needs (only when λ > 0: λ = 0 is exactly plain flow matching)
        self.capture: AttentionCapture | None = None
        self.capture_keys: list[int] = []
        if self.lam > 0:
            self.capture = AttentionCapture(
                mode=cfg.attention_loss.mode, recompute=cfg.attention_loss.recompute,
                routing_only=cfg.attention_loss.routing_only,
                heads=chosen_heads(cfg.attention_loss.heads, tr.config.num_attention_heads, "attention_loss.heads"))
            self._install_capture()
            if not self.capture_keys:
                raise UserError("attention_loss.weight > 0 but attention_loss.blocks and single_blocks choose no block")

        # 4. the encoded training set (after the model: reference sizes are the model's unless the config sets them)
        self.data = TrainingSet(samples, cfg.data, self.pipe.reference_options, self.pipe.vae_scale_factor,
                                text_trainable=cfg.train.train_text_encoders)
        self.pipe.reference_options = self.data.ref_options
        if cfg.model.ref_timestep_zero:  # validation samples get the conditioning the adapter is trained with
            self.pipe.reference_options = dataclasses.replace(self.data.ref_options, ref_timestep_zero=True)
        self.order = BatchOrder([it.key for it in self.data.items], cfg.data.batch_size, cfg.train.seed,
                                acc.num_processes, acc.process_index)
        self.noise_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + acc.process_index)
        self.data.precompute(self.pipe, self.device, self.dtype, progress=acc.is_main_process and cfg.output.progress)

        # 5. optimisation
        groups: list = self.params
        if self.text_params:
            text_ids = {id(p) for p in self.text_params}
            groups = [{"params": [p for p in self.params if id(p) not in text_ids], "lr": cfg.optim.lr},
                      {"params": self.text_params, "lr": cfg.optim.text_encoder_lr or cfg.optim.lr}]
        self.optimizer, self.scheduler = build_optimizer(groups, cfg.optim, cfg.train.max_steps)
        self.model, self.optimizer = acc.prepare(tr, self.optimizer)
        self.ema = EMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        # 6. where to start
        self.step = 0
        if self.resumed_from is not None:
            self._load(self.resumed_from)

    def _add_adapter(self) -> AdapterConfig:
        """A fresh adapter, or `adapter.init_adapter` loaded (plus fresh MoE experts when it has none); its weights
        become the trainable ones."""
        cfg, tr = self.cfg, self.transformer
        wanted = adapter_config(cfg, self.pipe.reference_options)
        if cfg.adapter.init_adapter:
            loaded = load_adapter(tr, cfg.adapter.init_adapter)
            if wanted.moe is not None and loaded.moe is None:  # e.g. a UNO LoRA, then fresh MoE experts on top
                inject_moe_lora(tr, wanted.moe)
                loaded.moe = wanted.moe
            elif (loaded.lora_rank, loaded.moe) != (wanted.lora_rank, wanted.moe):
                print(f"init_adapter {cfg.adapter.init_adapter}: its own structure (LoRA rank {loaded.lora_rank}, "
                      f"MoE {'yes' if loaded.moe else 'no'}) replaces the adapter section")
            loaded.extra = {**loaded.extra, **wanted.extra, "init_adapter": str(cfg.adapter.init_adapter)}
            result = loaded
        else:
            add_adapter(tr, wanted)
            result = wanted
        for p in adapter_parameters(tr):
            p.requires_grad_(True)
        return result

    def _install_capture(self) -> None:
        assert self.capture is not None
        self.capture_keys = install_capture(self.transformer, self.capture, self.cfg.attention_loss.blocks,
                                            self.cfg.attention_loss.single_blocks)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.transformer

    # -------------------------------------------------------------------------------------------- the loss
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """L = L_diff + λ·L_attn (+ MoE load-balance term) for one micro-batch."""
        x0 = batch["latents"]
        b = x0.shape[0]
        mu = None
        if self.cfg.train.timesteps.scheme == "flux_shift":
            mu = flux_mu(self.pipe.scheduler.config, x0.shape[1])
        sigmas = sample_sigmas(b, self.cfg.train.timesteps, self.noise_gen, mu=mu, device=self.device)
        noise = torch.randn(x0.shape, generator=self.noise_gen, dtype=torch.float32).to(self.device, x0.dtype)
        x_t, target = noisy_latents(x0, noise, sigmas)

        use_capture = self.capture is not None and batch["refs"] is not None
        if self.capture is not None:
            self.capture.maps.clear()
            self.capture.enabled = use_capture
        pred = self._predict(batch, x_t, sigmas, use_capture)

        loss_diff = flow_matching_loss(pred, target)
        loss = loss_diff
        loss_attn = torch.zeros((), device=self.device)
        if use_capture:
            loss_attn = self._attention_loss(batch["masks"], sigmas)
            loss = loss + self.lam * loss_attn
        out = {"loss_diff": loss_diff, "loss_attn": loss_attn}
        if moe_modules(self.unwrapped):
            aux = moe_aux_loss(self.unwrapped).to(self.device)
            weight = self.adapter_cfg.moe.load_balance_weight if self.adapter_cfg and self.adapter_cfg.moe else 0.0
            if weight > 0:
                loss = loss + weight * aux
            out["moe_aux"] = aux
        out["loss"] = loss
        return out

    def _predict(self, batch: dict, x_t: torch.Tensor, sigmas: torch.Tensor, use_capture: bool) -> torch.Tensor:
        """The velocity the model predicts for the noisy target, its references appended."""
        b, dtype = x_t.shape[0], x_t.dtype
        gh, gw = batch["grid"]
        latent_ids = self.pipe._prepare_latent_image_ids(b, gh, gw, self.device, dtype)
        if batch["prompt_embeds"] is None:  # trained text encoders: encode here, inside autocast and the graph
            with self.accelerator.autocast():
                batch["prompt_embeds"], batch["pooled"] = toy_base.encode_captions(
                    self.pipe, batch["captions"], batch["caption_dropped"], self.cfg.data.max_sequence_length,
                    self.device, self.dtype)
        text_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if getattr(self.unwrapped.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.cfg.model.guidance, device=self.device, dtype=torch.float32)
        with self.accelerator.autocast():
            return predict_velocity(self.model, x_t, latent_ids, sigmas, batch["prompt_embeds"], batch["pooled"],
                                    text_ids, refs=batch["refs"], guidance=guidance,
                                    capture=self.capture if use_capture else None)

    def _attention_loss(self, masks: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """L_attn between the captured maps (averaged over the chosen blocks) and the subjects' masks."""
        cfg = self.cfg.attention_loss
        maps = self.capture.aggregate(self.capture_keys)
        if cfg.normalize:
            maps = normalize_maps(maps)
        masks = masks.to(maps.device)
        attn_loss = ATTENTION_LOSSES[cfg.loss]
        if cfg.max_sigma is None:
            return attn_loss(maps, masks, eps=cfg.eps)
        # the samples above max_sigma leave the graph through a zero term (DDP sees every parameter)
        keep = sigmas.to(maps.device) <= cfg.max_sigma
        loss = maps.sum() * 0.0
        if keep.any():
            loss = loss + attn_loss(maps[keep], masks[keep], eps=cfg.eps)
        return loss

    # -------------------------------------------------------------------------------------------- the step
    def train_step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the step's record."""
        acc, t0 = self.accelerator, time.perf_counter()
        sums: dict[str, float] = {}
        n_micro = self.cfg.train.gradient_accumulation_steps
        lr = self.optimizer.param_groups[0]["lr"]
        gnorm = 0.0
        for _ in range(n_micro):
            batch = self.data.collate(self.order.next(), self.pipe, self.device, self.dtype, self.noise_gen)
            with acc.accumulate(self.model):
                losses = self.compute_losses(batch)
                acc.backward(losses["loss"])
                if acc.sync_gradients:
                    toy_base.average_text_gradients(acc, self.text_params)
                    if self.cfg.optim.max_grad_norm > 0:
                        gnorm = float(acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm))
                    else:
                        gnorm = grad_norm(self.params)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(acc.reduce(v.detach().float(), "mean")) / n_micro
        self.step += 1
        if self.ema is not None:
            self.ema.update()
        rec = {"step": self.step, "loss": sums["loss"], "loss_diff": sums["loss_diff"], "loss_attn": sums["loss_attn"],
               "lr": lr, "grad_norm": gnorm}
        if "moe_aux" in sums:
            rec["moe_aux"] = sums["moe_aux"]
        rec["sec_per_step"] = time.perf_counter() - t0
        return rec

    # -------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Everything a resume needs (a collective call: every rank's RNG state is gathered)."""
        return {"step": self.step, "trainable": {n: p.detach().cpu().clone() for n, p in self.named_params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "data": self.order.state_dict(),
                "rng": gather_rng_states(self.accelerator, {"noise": self.noise_gen}),
                "config": config_to_dict(self.cfg)}

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        named = self.named_params
        if set(state["trainable"]) != set(named):
            raise UserError(f"checkpoint {path} does not match this config's trainable weights "
                            f"({len(state['trainable'])} saved, {len(named)} here): same mode and adapter settings?")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.order.load_state_dict(state["data"])
        restore_rank_rng_state(self.accelerator, state["rng"], path, {"noise": self.noise_gen})
        self.step = checkpoint_step(path)

    def save_checkpoint(self) -> None:
        save_on_main(self.accelerator, self.output_dir, self.step, self.state_dict(), self.cfg.output.keep_last)

    # -------------------------------------------------------------------------------------------- outputs
    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        if self.ema is not None:
            self.ema.swap_in()
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap_out()

    def sampling_defaults(self) -> dict[str, Any]:
        """What the saved base should be sampled with: the loaded model's own defaults, and for a transformer trained
        here from scratch the one guidance value it has seen (it is not guidance-distilled) and the training size."""
        out = dict(getattr(self.pipe, "base_sampling_defaults", {}))
        if self.cfg.model.init_transformer:
            out.update(guidance_scale=self.cfg.model.guidance, height=self.cfg.data.resolution,
                       width=self.cfg.data.resolution, max_sequence_length=self.cfg.data.max_sequence_length)
        return out

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Images (+ attention figures when there are references) for the first samples, under samples/step-N/."""
        if not self.accelerator.is_main_process:
            return []
        rng = capture_rng_state({"noise": self.noise_gen})
        ref_t0 = find_ref_timestep(self.unwrapped)
        ref_t0_enabled = ref_t0.enabled if ref_t0 is not None else None  # kept whatever the pipeline does with it
        folder = self.output_dir / "samples" / f"step-{self.step:06d}"
        guidance = self.cfg.output.validation_guidance
        if guidance is None:
            guidance = self.sampling_defaults().get("guidance_scale", 3.5)
        written = []
        was_training = self.unwrapped.training
        self.unwrapped.eval()
        try:
            with self._ema_weights():
                for i in range(min(self.cfg.data.num_validation, len(self.data))):
                    it = self.data.items[i]
                    kw = dict(prompt=it.caption, height=it.size[1], width=it.size[0],
                              num_inference_steps=self.cfg.output.validation_steps, guidance_scale=guidance,
                              max_sequence_length=self.cfg.data.max_sequence_length,
                              generator=torch.Generator().manual_seed(self.cfg.train.seed + i))
                    with self.accelerator.autocast():  # prepare() makes the transformer return fp32 under AMP
                        out = self.pipe(reference_images=list(it.refs), return_attention=bool(it.refs), **kw)
                    save_image_atomic(out.images[0], folder / f"{it.name}.png")
                    written.append(folder / f"{it.name}.png")
                    if out.attention_maps is not None:
                        save_attention_figure(out.images[0], out.attention_maps, folder / f"{it.name}_attention.png",
                                              it.subject_names)
                        written.append(folder / f"{it.name}_attention.png")
        finally:
            self.unwrapped.train(was_training)
            if self.capture is not None:
                self.capture.clear()
                self.capture.enabled = True
            restore_rng_state(rng, {"noise": self.noise_gen})
            if ref_t0 is not None:
                ref_t0.enabled = ref_t0_enabled
        return written

    def save_final(self) -> Path:
        """Adapter mode: OUTPUT/adapter (adapter-directory format). Base mode: OUTPUT/pipeline (save_pretrained)."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return self.output_dir
        with self._ema_weights():
            if self.cfg.train.mode == "adapter":
                return save_adapter(self.unwrapped, self.output_dir / "adapter", self.adapter_cfg)
            if self.capture is not None:  # save the stock processors, not the capture ones
                remove_capture(self.unwrapped)
            try:
                ro = self.data.ref_options
                return toy_base.save_pipeline(
                    self.pipe, self.output_dir / "pipeline",
                    {"long_side_single": ro.long_side_single, "long_side_multi": ro.long_side_multi},
                    self.sampling_defaults())
            finally:
                if self.capture is not None:
                    self._install_capture()

    # -------------------------------------------------------------------------------------------- the loop
    def run(self, stop_at: int | None = None) -> dict | None:
        """Train to `stop_at` (default train.max_steps); logs, checkpoints, validates; returns the last record."""
        out = self.cfg.output
        end = stop_at or self.cfg.train.max_steps
        schedule = LogSchedule(out.log_every, self.cfg.train.max_steps, end)
        self.metrics = MetricsLogger(self.output_dir, enabled=self.accelerator.is_main_process, keep=schedule.due,
                                     resume_step=self.step if self.resumed_from is not None else None)
        last = None
        bar = tqdm(total=end, initial=self.step, desc="pretrain", dynamic_ncols=True,
                   disable=not (out.progress and self.accelerator.is_main_process))
        try:
            while self.step < end:
                rec = last = self.train_step()
                if schedule.due(self.step):
                    self.metrics.log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", attn=f"{rec['loss_attn']:.3f}")
                if out.checkpoint_every and self.step % out.checkpoint_every == 0 and self.step < end:
                    self.save_checkpoint()
                if out.validate_every and self.step % out.validate_every == 0 and self.step < end:
                    self.validate()
        finally:
            bar.close()
        if last is not None or self.resumed_from is None:
            self.save_checkpoint()
        self.validate()
        self.save_final()
        self.metrics.close()
        return last

    def close(self) -> None:
        """Close the metrics file and release the output folder."""
        if self.metrics is not None:
            self.metrics.close()
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    return training_parser("python -m train.pretrain", __doc__.split("\n\n")[0],
                           "YAML config (see train/configs/*.yaml)", "overrides output.output_dir")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = load_config(args.config, PretrainConfig, parse_set_overrides(args.set))
    with Trainer(cfg, output_dir=args.output_dir, resume=args.resume) as trainer:
        if trainer.resumed_from is not None and trainer.accelerator.is_main_process:
            print(f"resumed from {trainer.resumed_from} at step {trainer.step}")
        last = trainer.run(stop_at=args.max_steps)
        if trainer.accelerator.is_main_process:
            what = "adapter" if cfg.train.mode == "adapter" else "pipeline"
            loss = f", last loss {last['loss']:.4f}" if last else ""
            print(f"done: step {trainer.step}{loss}; {what} saved under {trainer.output_dir / what}")
    return 0


if __name__ == "__main__":
    run_cli(main)


__all__ = ["PretrainConfig", "Trainer", "adapter_config", "build_parser", "main"]
