"""Reference tokens at timestep 0 (MOSAIC-style option): the references are clean images, so they can be modulated
with the t = 0 embedding while the target keeps the current timestep's.

FLUX blocks modulate the whole image stream with one AdaLN embedding per sample. This module gives the blocks a
per-token variant: the image stream [target | refs] is normalised/gated with temb for the target (and text) tokens and
with temb_0 for the reference tokens. Everything else (attention processors, capture, LoRA, MoE-LoRA) is the
blocks' own code. Off by default (references share the target's timestep, as UNO); switch it on with
`ReferenceOptions(ref_timestep_zero=True)` in the pipeline, or `install_ref_timestep(transformer)` in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTR = "_multicrafter_ref_t0"


@dataclass
class RefTimestepState:
    """Shared state of the t = 0 reference modulation on one transformer (set per call by the pipeline or trainer)."""

    enabled: bool = True
    n_ref: int = 0                       # reference tokens at the end of the image stream
    temb_ref: torch.Tensor | None = None  # (B, D) embedding at t = 0, computed per forward

    @property
    def active(self) -> bool:
        """Whether the next forward modulates reference tokens with the t = 0 embedding."""
        return self.enabled and self.n_ref > 0 and self.temb_ref is not None


def _split_mod(linear_out: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    return list(linear_out.chunk(chunks, dim=1))


def _per_token(a: torch.Tensor, b: torch.Tensor, n_a: int, n_b: int) -> torch.Tensor:
    """(B, D) for the first n_a tokens and (B, D) for the last n_b -> (B, n_a + n_b, D)."""
    return torch.cat([a[:, None].expand(-1, n_a, -1), b[:, None].expand(-1, n_b, -1)], dim=1)


def _double_forward(block, state: RefTimestepState, hidden_states, encoder_hidden_states, temb,
                    image_rotary_emb=None, joint_attention_kwargs=None):
    n_ref = state.n_ref
    n_img = hidden_states.shape[1] - n_ref
    norm1 = block.norm1
    mods = [_per_token(a, b, n_img, n_ref) for a, b in zip(
        _split_mod(norm1.linear(norm1.silu(temb)), 6), _split_mod(norm1.linear(norm1.silu(state.temb_ref)), 6))]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    norm_hidden_states = norm1.norm(hidden_states) * (1 + scale_msa) + shift_msa
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb)
    attn_output, context_attn_output = block.attn(
        hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))[:2]
    hidden_states = hidden_states + gate_msa * attn_output
    norm_hidden_states = block.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    hidden_states = hidden_states + gate_mlp * block.ff(norm_hidden_states)
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_encoder_hidden_states = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_encoder_hidden_states)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_forward(block, state: RefTimestepState, hidden_states, encoder_hidden_states, temb,
                    image_rotary_emb=None, joint_attention_kwargs=None):
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    n_ref = state.n_ref
    n_rest = hidden_states.shape[1] - n_ref
    norm = block.norm
    shift, scale, gate = [_per_token(a, b, n_rest, n_ref) for a, b in zip(
        _split_mod(norm.linear(norm.silu(temb)), 3), _split_mod(norm.linear(norm.silu(state.temb_ref)), 3))]
    residual = hidden_states
    norm_hidden_states = norm.norm(hidden_states) * (1 + scale) + shift
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                             **(joint_attention_kwargs or {}))
    hidden_states = residual + gate * block.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class _BlockSwitch:
    """Stands in for a block's forward: the per-token path while the state is active, the block's own otherwise."""

    def __init__(self, original_forward, fn, block, state):
        self.original_forward, self.fn, self.block, self.state = original_forward, fn, block, state

    def forward(self, *args, **kwargs):
        if not self.state.active:
            return self.original_forward(*args, **kwargs)
        names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
        kwargs.update(dict(zip(names, args)))
        return self.fn(self.block, self.state, **kwargs)


def install_ref_timestep(transformer: torch.nn.Module) -> RefTimestepState:
    """Give every block the per-token path and a pre-hook computing temb_0; returns the shared state (idempotent)."""
    existing = getattr(transformer, _ATTR, None)
    if existing is not None:
        return existing[0]
    state = RefTimestepState(enabled=False)
    for block in transformer.transformer_blocks:
        block.forward = _BlockSwitch(block.forward, _double_forward, block, state).forward
    for block in transformer.single_transformer_blocks:
        block.forward = _BlockSwitch(block.forward, _single_forward, block, state).forward

    def pre(module, args, kwargs):
        if state.enabled and state.n_ref > 0:
            dtype = module.x_embedder.weight.dtype
            t0 = torch.zeros_like(kwargs["timestep"]).to(dtype)
            pooled = kwargs["pooled_projections"]
            guidance = kwargs.get("guidance")
            if guidance is None:
                state.temb_ref = module.time_text_embed(t0, pooled)
            else:
                state.temb_ref = module.time_text_embed(t0, guidance.to(dtype) * 1000, pooled)
        else:
            state.temb_ref = None
        return args, kwargs

    handle = transformer.register_forward_pre_hook(pre, with_kwargs=True)
    setattr(transformer, _ATTR, (state, handle))
    return state


def find_ref_timestep(transformer: torch.nn.Module) -> RefTimestepState | None:
    """The state installed by `install_ref_timestep` on this transformer, or None."""
    existing = getattr(transformer, _ATTR, None)
    return existing[0] if existing is not None else None
