"""Attention capture for the double-stream blocks (and, our extension, single-stream ones): how much each reference
subject attends to each target position.

Paper: in double block k, m_k^i = Softmax(Q_{k,i} K^T / sqrt(d)), Q_{k,i} = queries of subject i's reference tokens,
K = all keys (text + target + references). We keep the target-key columns, average over subject i's queries and
over heads, average over the captured blocks and normalise -> M^_i on the packed target grid (`ref2img`).
`img2ref` is the transposed view: for each target query, the attention mass it puts on subject i's keys; it is
computed exactly with one extra fused SDPA whose values are one-hot subject-membership columns.

Memory: only the (sum l_i) x L slice is formed, in head chunks (never L x L), and the block output itself still
comes from the same `dispatch_attention_fn` call as diffusers' FluxAttnProcessor, so it is unchanged. Maps are
differentiable (for the Dice loss) and stay correct under non-reentrant gradient checkpointing: a recomputed block
simply overwrites its own entry. With `recompute=True` the slice is recomputed in backward instead of stored.

Usage: `capture = AttentionCapture(); install_capture(transformer, capture)`; before each forward set
`capture.layout = CaptureLayout(n_text, n_target, ref_lengths)`; after it, `capture.aggregate()` gives (B, N, n_t).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch.utils.checkpoint import checkpoint

from .errors import UserError

MODES = ("ref2img", "img2ref")


@dataclass
class CaptureLayout:
    """Where things sit in the joint sequence [text | target | ref_1 | ... | ref_N]."""

    n_text: int
    n_target: int
    ref_lengths: list[int]

    @property
    def n_refs(self) -> int:
        """Number of reference subjects."""
        return len(self.ref_lengths)


@dataclass
class AttentionCapture:
    """Shared state between the pipeline/trainer and the capture processors (not passed via joint_attention_kwargs)."""

    mode: str = "ref2img"
    recompute: bool = False          # recompute the map slice in backward instead of storing it
    head_chunk: int = 8              # heads per chunk when forming the (l x L) slice
    # True: the maps are formed from the block's inputs detached, so a loss on them trains only the block's query/key
    # projections (its routing), never the hidden states that carry identity into the values (our extension)
    routing_only: bool = False
    # heads whose maps are formed (then averaged); None: every head, as in the paper. Pinning a subset leaves the
    # other heads free to read the references from anywhere (our extension)
    heads: list[int] | None = None
    enabled: bool = True
    layout: CaptureLayout | None = None
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (B, N, n_target), current forward
    # Inference accumulators (detached, bounded: steps x N x n_t + blocks x N x n_t).
    per_step: list[torch.Tensor] = field(default_factory=list)
    per_block_sum: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"capture mode must be one of {MODES}, got {self.mode!r}")

    @property
    def active(self) -> bool:
        """Whether the next forward records maps (enabled, with a layout that has references)."""
        return self.enabled and self.layout is not None and self.layout.n_refs > 0

    def clear(self) -> None:
        """Drop every recorded map (current forward, per step and per block)."""
        self.maps.clear()
        self.per_step.clear()
        self.per_block_sum.clear()

    def aggregate(self, blocks: Iterable[int] | None = None) -> torch.Tensor:
        """Mean over captured blocks of the current forward: (B, N, n_target), not yet normalised."""
        keys = sorted(self.maps) if blocks is None else [b for b in blocks if b in self.maps]
        if not keys:
            raise RuntimeError("no attention maps were captured (is the capture installed and a layout set?)")
        return torch.stack([self.maps[k] for k in keys]).mean(0)

    def end_step(self) -> None:
        """Fold this forward's maps into the per-step and per-block stores (inference inspection)."""
        if not self.maps:
            return
        self.per_step.append(self.aggregate().detach().float().cpu())
        for k, m in self.maps.items():
            m = m.detach().float().cpu()
            self.per_block_sum[k] = self.per_block_sum[k] + m if k in self.per_block_sum else m
        self.maps.clear()

    def per_block(self) -> dict[int, torch.Tensor]:
        """Mean over steps of each block's map."""
        return {k: v / max(len(self.per_step), 1) for k, v in sorted(self.per_block_sum.items())}


def chosen_heads(heads: Iterable[int] | None, n_heads: int, what: str = "attention heads") -> list[int] | None:
    """Sorted distinct head indices, checked against the model's head count (None: every head)."""
    if heads is None:
        return None
    chosen = sorted(set(heads))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_heads:
        raise UserError(f"{what} must list heads in 0..{n_heads - 1} (or be null for all), got {list(heads)}")
    return chosen


def normalize_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each subject's map so its peak is 1 (the form the Dice loss compares with a binary mask)."""
    peak = maps.amax(dim=-1, keepdim=True) if maps.dim() <= 3 else maps.flatten(-2).amax(-1)[..., None, None]
    return maps / (peak + eps)


def _segment_mean(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, sum l_i, T) -> (B, N, T): mean over each subject's rows."""
    return torch.stack([chunk.mean(1) for chunk in x.split(lengths, dim=1)], dim=1)


def ref2img_maps(query: torch.Tensor, key: torch.Tensor, layout: CaptureLayout, head_chunk: int = 8) -> torch.Tensor:
    """(B, N, n_target): softmax over ALL keys for each reference query, target columns kept, mean over queries/heads.

    query/key: (B, L, H, d) after RoPE. Forms at most (B, head_chunk, sum l_i, L) at a time.
    """
    start = layout.n_text + layout.n_target
    q = query[:, start:start + sum(layout.ref_lengths)].transpose(1, 2)  # (B, H, Lr, d)
    k = key.transpose(1, 2)                                                  # (B, H, L, d)
    scale = q.shape[-1] ** -0.5
    t0, t1 = layout.n_text, layout.n_text + layout.n_target
    acc = None
    for h0 in range(0, q.shape[1], head_chunk):
        # Matmul in the model's dtype (tensor cores accumulate in fp32), softmax in fp32.
        scores = torch.matmul(q[:, h0:h0 + head_chunk], k[:, h0:h0 + head_chunk].transpose(-1, -2)).float()
        probs = torch.softmax(scores * scale, dim=-1)[..., t0:t1].sum(1)     # (B, Lr, n_t)
        acc = probs if acc is None else acc + probs
    return _segment_mean(acc / q.shape[1], layout.ref_lengths)


def img2ref_maps(query: torch.Tensor, key: torch.Tensor, layout: CaptureLayout) -> torch.Tensor:
    """(B, N, n_target): attention mass each target query puts on subject i's keys (one-hot-value SDPA)."""
    t0, t1 = layout.n_text, layout.n_text + layout.n_target
    q = query[:, t0:t1].transpose(1, 2)          # (B, H, n_t, d)
    k = key.transpose(1, 2)                      # (B, H, L, d)
    L, n = k.shape[2], layout.n_refs
    onehot = torch.zeros(L, n, dtype=q.dtype, device=q.device)
    start = t1
    for i, length in enumerate(layout.ref_lengths):
        onehot[start:start + length, i] = 1
        start += length
    v = onehot.expand(k.shape[0], k.shape[1], L, n)
    mass = F.scaled_dot_product_attention(q, k, v)  # (B, H, n_t, N)
    return mass.float().mean(1).transpose(1, 2)


def _joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
               image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[text | image] queries, keys and values, normalised and rotated as FLUX does. A double-stream block gets the
    two streams apart; a single-stream block gets them already joined (`encoder_hidden_states` None)."""
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_query is not None:
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class CaptureAttnProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that also records the subject attention map of its block.

    The body mirrors diffusers' FluxAttnProcessor (same helpers, same SDPA call; double-stream blocks pass the text
    stream apart, single-stream blocks pass one joined sequence), so the block output is unchanged; the only addition
    is the `_record` call on the post-RoPE queries and keys (recomputed from detached inputs when
    `capture.routing_only`).
    """

    def __init__(self, capture: AttentionCapture, block_index: int):
        super().__init__()
        self.capture = capture
        self.block_index = block_index

    def _record(self, query: torch.Tensor, key: torch.Tensor) -> None:
        cap, layout = self.capture, self.capture.layout
        if cap.heads is not None:  # (B, L, H, d): keep the chosen heads only
            index = torch.tensor(cap.heads, device=query.device)
            query, key = query.index_select(2, index), key.index_select(2, index)
        if cap.mode == "ref2img":
            fn = lambda q, k: ref2img_maps(q, k, layout, cap.head_chunk)  # noqa: E731
        else:
            fn = lambda q, k: img2ref_maps(q, k, layout)  # noqa: E731
        if cap.recompute and torch.is_grad_enabled():
            maps = checkpoint(fn, query, key, use_reentrant=False)
        else:
            maps = fn(query, key)
        cap.maps[self.block_index] = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.capture.active:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = _joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if self.capture.routing_only and torch.is_grad_enabled():
            detached = encoder_hidden_states.detach() if encoder_hidden_states is not None else None
            self._record(*_joint_qkv(attn, hidden_states.detach(), detached, image_rotary_emb)[:2])
        else:
            self._record(query, key)

        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream block: its caller projects and splits
            return out
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        encoder_out = attn.to_add_out(encoder_out.contiguous())
        return out, encoder_out


def install_capture(transformer: torch.nn.Module, capture: AttentionCapture, blocks: Iterable[int] | None = None,
                    single_blocks: Iterable[int] | None = None) -> list[int]:
    """Swap the capture processor into the chosen double-stream blocks (all by default) and, optionally, into
    single-stream blocks (our extension; none by default), UNO-style processor swap. Returns the capture keys: a
    double block's own index, single block i as n_double + i (the order the blocks run in)."""
    n = len(transformer.transformer_blocks)
    chosen = list(range(n)) if blocks is None else sorted({b % n for b in blocks})
    for i in chosen:
        transformer.transformer_blocks[i].attn.set_processor(CaptureAttnProcessor(capture, i))
    singles = getattr(transformer, "single_transformer_blocks", [])
    for i in sorted({b % len(singles) for b in single_blocks}) if single_blocks and len(singles) else []:
        singles[i].attn.set_processor(CaptureAttnProcessor(capture, n + i))
        chosen.append(n + i)
    return chosen


def _all_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def remove_capture(transformer: torch.nn.Module) -> None:
    """Put diffusers' stock processor back into every block that has a capture processor."""
    for block in _all_blocks(transformer):
        if isinstance(block.attn.processor, CaptureAttnProcessor):
            block.attn.set_processor(FluxAttnProcessor())


def find_capture(transformer: torch.nn.Module) -> AttentionCapture | None:
    """The capture shared by the processors installed on this transformer, or None."""
    for block in _all_blocks(transformer):
        if isinstance(block.attn.processor, CaptureAttnProcessor):
            return block.attn.processor.capture
    return None
