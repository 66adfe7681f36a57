"""MoE-LoRA (docs/method.md): a per-token top-k mixture of LoRA experts on the FFN linears of the output-side blocks.

    p = Softmax(TopK(W_g h, k))   (the other experts at −∞)
    h_out = base(h) + Σ_i p_i (α/r) B_i A_i h

peft has no trainable per-token top-k LoRA mixture, so the module is written here. B is zero-initialised, so an
injected model starts exactly as the base model. With k = 1 the softmax over one logit is the constant 1, so the
router would get no gradient from the task loss; by default a straight-through term p_full − stopgrad(p_full)
(value 0) is added to the routed gate, which keeps the forward exactly the paper's while the router learns as in
Switch Transformers. Routing is deterministic unless `router_noise` > 0 and the module is in training mode.

Parameter layout (saved as is by `moe_state_dict`): `router.weight` (E, in), `expert_A` (E, r, in),
`expert_B` (E, r, out). The names avoid "lora_" so peft's state-dict helpers never pick them up. Over a fp16/bf16
base these weights are kept in fp32 (as peft keeps LoRA weights) and cast to the input's dtype for compute.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

SINGLE_FFN = ("proj_mlp", "proj_out")
DOUBLE_FFN = ("ff.net.0.proj", "ff.net.2")
IMPLS = ("auto", "dense", "grouped")
# impl "auto": compute all experts densely while (E − k)·r stays at or below this (see MoELoRALinear._use_dense)
DENSE_MAX_EXTRA_RANK_CPU = 128
DENSE_MAX_EXTRA_RANK_GPU = 2048
# Top-1 inference on CPU with each expert merged into its own copy of the base weight (W + s·B_e·A_e): one linear per
# token instead of base + A + B, for E copies of the weight. Only while those copies stay small (the toy's: under 3 MB
# per layer; FLUX.1-dev's proj_out would need 377 MB per layer in bf16).
MERGED_EXPERTS_MAX_BYTES = 64 * 2**20


@dataclass
class MoELoRAConfig:
    """Which linears get a mixture of LoRA experts, and how it routes and trains."""

    num_experts: int = 4
    top_k: int = 1
    rank: int = 16
    alpha: float = 16.0
    blocks: str = "single"  # "single", "double" or "both": whose FFN linears (ignored when target_regex is set)
    num_blocks: int = 8  # the last N blocks of each chosen kind (the output side), clipped to what the model has
    target_regex: str | None = None  # full-match regex over module names; overrides blocks/num_blocks
    load_balance_weight: float = 0.0  # weight of `moe_aux_loss` in the training loss (the trainer applies it)
    router_noise: float = 0.0  # std of Gaussian noise on router logits, training mode only
    straight_through_router: bool = True  # top-1 only: give the router the Switch gradient (forward unchanged)
    impl: str = "auto"  # "dense" (all experts, masked), "grouped" (tokens sorted by expert) or "auto"

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"MoE-LoRA needs 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                            f"num_experts={self.num_experts}")
        if self.rank < 1 or self.num_blocks < 1:
            raise UserError(f"MoE-LoRA rank and num_blocks must be >= 1, got {self.rank} and {self.num_blocks}")
        if self.blocks not in ("single", "double", "both"):
            raise UserError(f"MoE-LoRA blocks must be single, double or both, got {self.blocks!r}")
        if self.impl not in IMPLS:
            raise UserError(f"MoE-LoRA impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                raise UserError(f"MoE-LoRA target_regex is not a valid regex: {exc}") from None

    def to_dict(self) -> dict:
        """The config as a JSON-able dict (the `moe` section of adapter_config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoELoRAConfig:
        """Build a config from a dict, refusing unknown keys with a UserError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown MoE-LoRA config key(s): {', '.join(unknown)}")
        return cls(**data)


def default_target_regex(model: nn.Module, cfg: MoELoRAConfig) -> str:
    """Anchored regex for the FFN linears of the last `num_blocks` blocks (a bare `proj_out` would hit the head)."""
    parts = []
    kinds = {"single": [("single_transformer_blocks", SINGLE_FFN)], "double": [("transformer_blocks", DOUBLE_FFN)]}
    kinds["both"] = kinds["double"] + kinds["single"]
    for attr, linears in kinds[cfg.blocks]:
        blocks = getattr(model, attr, None)
        if blocks is None or len(blocks) == 0:
            continue
        n = len(blocks)
        ids = "|".join(str(i) for i in range(max(0, n - cfg.num_blocks), n))
        names = "|".join(re.escape(x) for x in linears)
        parts.append(rf"{re.escape(attr)}\.({ids})\.({names})")
    if not parts:
        raise UserError(f"the model has no {cfg.blocks} transformer blocks for MoE-LoRA")
    return "^(" + "|".join(parts) + ")$"


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a routed mixture of LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Linear, num_experts: int = 4, top_k: int = 1, rank: int = 16, alpha: float = 16.0,
                 router_noise: float = 0.0, straight_through_router: bool = True, impl: str = "auto") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise UserError(f"MoE-LoRA wraps nn.Linear only, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        # Trainable weights in fp32 over a half-precision or quantised base (as peft does for LoRA; a bitsandbytes
        # 4-bit weight reports uint8); compute in the input's dtype.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.scaling = alpha / rank
        self.router_noise = router_noise
        self.straight_through_router = straight_through_router
        self.impl = impl
        self.enabled = True
        self.fuse_router: bool | None = None  # dense: one matmul for router + A's (None: on CPU only)
        # Inference may run top-1 through per-expert merged weights (on CPU, float32, up to MERGED_EXPERTS_MAX_BYTES).
        # Off by default: IPPO's rollouts must compute exactly what its update recomputes with autograd on; an
        # inference pipeline switches it on together with fusing its LoRA (`adapters.fuse_lora`).
        self.merge_experts = False
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=w.device, dtype=dtype)
        self.expert_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=w.device, dtype=dtype))
        self.expert_B = nn.Parameter(torch.zeros(num_experts, rank, self.out_features, device=w.device, dtype=dtype))
        for a in self.expert_A:  # each A like nn.Linear / peft lora_A: kaiming-uniform over its fan-in
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self._last_idx: torch.Tensor | None = None  # routing of the last forward (counts, load-balance loss)
        self._last_probs: torch.Tensor | None = None

    def extra_repr(self) -> str:
        """Sizes and settings shown in the module's repr."""
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}")

    def _use_dense(self, device: torch.device) -> bool:
        if self.impl != "auto":
            return self.impl == "dense"
        # Dense does (E − k)·r·(in + out) extra multiply-adds per token; grouped instead moves every token's input and
        # output through a gather/scatter, launches more small kernels and syncs with the host for the group sizes.
        # Both extras scale with in + out, so the break-even is a rank (bench/moe_lora_speed.py): on CPU dense wins at
        # (E − k)·r = 48 and loses at 192; on an H200 (bf16, FLUX shapes) dense wins at every rank up to 512.
        limit = DENSE_MAX_EXTRA_RANK_CPU if device.type == "cpu" else DENSE_MAX_EXTRA_RANK_GPU
        return (self.num_experts - self.top_k) * self.rank <= limit

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits → (expert ids (N, k), gate matrix (N, E): p_i at routed experts, 0 elsewhere, softmax)."""
        logits = logits.float()  # route in fp32: bf16 logits tie and round the gates
        if self.training and self.router_noise > 0:
            logits = logits + self.router_noise * torch.randn_like(logits)
        probs = logits.softmax(dim=-1)
        if self.top_k == 1:  # Softmax over one kept logit is exactly 1
            idx = logits.argmax(dim=-1, keepdim=True)
            w = torch.zeros_like(probs).scatter_(1, idx, 1.0)
            if self.straight_through_router:  # value stays exactly 1 (0 + 1); gradient is Switch's d p_top
                w = w * ((probs - probs.detach()) + 1.0)
        else:  # softmax over the kept logits == softmax with the others at −inf
            top, idx = logits.topk(self.top_k, dim=-1)
            w = torch.zeros_like(probs).scatter(1, idx, top.softmax(dim=-1))
        return idx, w, probs

    def _dense(self, h: torch.Tensor, out: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """All experts at once (z = A h for every expert), unrouted ones masked to 0; scaling and add fused in addmm."""
        n, e, r = h.shape[0], self.num_experts, self.rank
        z = (z.view(n, e, r) * w.to(z.dtype).unsqueeze(-1)).view(n, e * r)
        b = self.expert_B.reshape(e * r, self.out_features).to(z.dtype)
        return torch.addmm(out, z, b, alpha=self.scaling)

    def _cached(self, slot: str, tensors: tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], Any]) -> Any:
        """`build()`, kept in `slot` and reused until one of `tensors` changes in place or is replaced (their
        version counters and storages key the cache) or `extra` differs."""
        key = (*extra, *((t._version, t.data_ptr()) for t in tensors))
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.__dict__[slot] = cached
        return cached[1]

    def _inference_weights(self, dtype: torch.dtype, fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(router rows + all A's stacked, or the A's alone; all B's) in `dtype`, built once and reused until a
        weight changes."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            e, r = self.num_experts, self.rank
            a = self.expert_A.detach().reshape(e * r, self.in_features)
            first = torch.cat([self.router.weight.detach(), a]) if fuse else a
            return first.to(dtype), self.expert_B.detach().reshape(e * r, self.out_features).to(dtype)

        return self._cached("_inference_cache", (self.router.weight, self.expert_A, self.expert_B), (dtype, fuse),
                            build)

    def _dense_top1_inference(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Top-1 routing without autograd: the same numbers as `_dense` with fewer ops (no softmax, no gate
        matrix, the stacked weights cached), since the routed gate is exactly 1."""
        n, e, r = h.shape[0], self.num_experts, self.rank
        fuse = (self.fuse_router if self.fuse_router is not None else h.device.type == "cpu") and h.dtype == torch.float32
        first, b = self._inference_weights(h.dtype, fuse)
        if fuse:
            logits, z = F.linear(h, first).split([e, e * r], dim=1)
        else:
            logits = F.linear(h.float(), self.router.weight.float())  # route in fp32 (bf16 logits tie)
            z = F.linear(h, first)
        idx = logits.argmax(dim=-1, keepdim=True)
        self._last_idx, self._last_probs = idx, None
        keep = idx == torch.arange(e, device=idx.device)           # (n, E): the routed expert
        z = (z.view(n, e, r) * keep.unsqueeze(-1).to(z.dtype)).view(n, e * r)
        out2d = out.reshape(-1, self.out_features)
        return torch.addmm(out2d, z, b, alpha=self.scaling)

    def _use_merged(self, h: torch.Tensor) -> bool:
        if not self.merge_experts or self.top_k != 1 or type(self.base) is not nn.Linear:
            return False
        weight = self.base.weight
        if type(weight.data) is not torch.Tensor or weight.dtype != h.dtype:   # quantised or another dtype
            return False
        return (h.device.type == "cpu" and h.dtype == torch.float32
                and self.num_experts * weight.numel() * weight.element_size() <= MERGED_EXPERTS_MAX_BYTES)

    def _merged_weights(self) -> torch.Tensor:
        """(E, out, in): the base weight with each expert's update merged in, rebuilt when any weight changes."""
        w = self.base.weight

        def build() -> torch.Tensor:
            delta = torch.bmm(self.expert_B.detach().transpose(1, 2), self.expert_A.detach())   # (E, out, in)
            return (w.detach().unsqueeze(0) + self.scaling * delta.to(w.dtype)).contiguous()

        return self._cached("_merged_cache", (w, self.expert_A, self.expert_B), (), build)

    def _merged_top1_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 routing without autograd, each token through its expert's merged weight: the same function as base
        plus `_dense` (up to float rounding) with one weight matmul per token."""
        h = x.reshape(-1, self.in_features)
        idx = F.linear(h.float(), self.router.weight.float()).argmax(dim=-1)   # route in fp32, as training does
        self._last_idx, self._last_probs = idx.unsqueeze(-1), None
        merged, bias = self._merged_weights(), self.base.bias
        counts = torch.bincount(idx, minlength=self.num_experts).tolist()
        if max(counts) == h.shape[0]:                       # every token on one expert: no gather / scatter
            return F.linear(x, merged[int(idx[0])], bias)
        # tokens sorted by expert, each group's output written straight into its rows, then gathered back in order
        order = torch.argsort(idx, stable=True)
        parts = h.index_select(0, order).split(counts)
        buf = torch.empty(h.shape[0], self.out_features, dtype=h.dtype, device=h.device)
        for e, (part, dst) in enumerate(zip(parts, buf.split(counts))):
            if part.shape[0]:
                if bias is None:
                    torch.mm(part, merged[e].t(), out=dst)
                else:
                    torch.addmm(bias, part, merged[e].t(), out=dst)
        return buf.index_select(0, torch.argsort(order)).view(*x.shape[:-1], self.out_features)

    def _grouped(self, h: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, one small matmul pair per expert, results added back at their rows."""
        k = self.top_k
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k if k > 1 else order
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # host sync: sizes of the groups
        hs = h.index_select(0, tok).split(counts)  # split/unbind, not slicing: their backward does not zero-fill
        cs = w.gather(1, idx).reshape(-1)[order].to(h.dtype).unsqueeze(-1).split(counts)
        As, Bs = self.expert_A.to(h.dtype).unbind(0), self.expert_B.to(h.dtype).unbind(0)
        ys = [((hs[e] @ As[e].t()) * cs[e]) @ Bs[e] for e, c in enumerate(counts) if c]
        return out.index_add_(0, tok, torch.cat(ys), alpha=self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FFN(x) plus the routed experts' low-rank updates (just FFN(x) when disabled)."""
        if not self.enabled:
            return self.base(x)
        lean = self.top_k == 1 and not torch.is_grad_enabled() and not (self.training and self.router_noise > 0)
        if lean and self._use_merged(x):
            return self._merged_top1_inference(x)
        out = self.base(x)
        h = x.reshape(-1, self.in_features)
        e, r = self.num_experts, self.rank
        dense = self._use_dense(h.device)
        if dense and lean:
            return self._dense_top1_inference(h, out).view(out.shape)
        z = None
        fuse = self.fuse_router if self.fuse_router is not None else h.device.type == "cpu"
        if dense and fuse:  # router and all A's in one matmul: saves an input-gradient pass on CPU; on GPU the
            # E extra rows misalign the GEMM (measured slower at large ranks), so there it stays separate
            weight = torch.cat([self.router.weight, self.expert_A.reshape(e * r, self.in_features)]).to(h.dtype)
            logits, z = F.linear(h, weight).split([e, e * r], dim=1)
            if h.dtype != torch.float32:  # route from fp32 logits (bf16 ones tie); only the router rows again
                logits = F.linear(h.float(), self.router.weight.float())
        else:
            logits = F.linear(h.float(), self.router.weight.float())  # route in fp32 (bf16 logits tie)
            if dense:
                z = F.linear(h, self.expert_A.reshape(e * r, self.in_features).to(h.dtype))
        idx, w, probs = self.route(logits)
        self._last_idx = idx.detach()
        self._last_probs = probs if torch.is_grad_enabled() else None  # kept for the load-balance loss
        out2d = out.reshape(-1, self.out_features)
        mixed = self._dense(h, out2d, z, w) if dense else self._grouped(h, out2d, idx, w)
        return mixed.view(out.shape)

    @property
    def last_counts(self) -> torch.Tensor | None:
        """Tokens routed to each expert in the last forward (top-k: assignments)."""
        idx = self._last_idx
        return None if idx is None else torch.bincount(idx.reshape(-1), minlength=self.num_experts)

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        """Switch load-balance loss E · Σ_i f_i P_i of the last forward with grad enabled (f: share of routed
        assignments, P: mean router probability); 1 when balanced. Computed on demand, so it costs nothing unused."""
        if self._last_probs is None:
            return None
        frac = self.last_counts.to(self._last_probs.dtype) / self._last_idx.numel()
        return self.num_experts * (frac * self._last_probs.mean(0)).sum()


def moe_modules(model: nn.Module) -> dict[str, MoELoRALinear]:
    """All MoE-LoRA modules of `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def inject_moe_lora(model: nn.Module, cfg: MoELoRAConfig) -> list[str]:
    """Replace every `nn.Linear` (quantised ones included) whose name fully matches the target regex by a
    `MoELoRALinear`; return the names."""
    regex = re.compile(cfg.target_regex or default_target_regex(model, cfg))
    names = [n for n, _ in model.named_modules() if n and regex.fullmatch(n)]
    if not names:
        raise UserError(f"MoE-LoRA target regex {regex.pattern!r} matches no module of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        target = getattr(parent, child)
        if isinstance(target, MoELoRALinear):
            raise UserError(f"{name} already has MoE-LoRA; remove the adapter first")
        # nn.Linear or a quantised subclass (bitsandbytes' Linear4bit / Linear8bitLt); a peft LoRA wrapper is not one
        if not isinstance(target, nn.Linear):
            raise UserError(f"MoE-LoRA target {name} is a {type(target).__name__}, not an nn.Linear "
                            "(does the LoRA target it too?)")
        moe = MoELoRALinear(target, cfg.num_experts, cfg.top_k, cfg.rank, cfg.alpha, cfg.router_noise,
                            cfg.straight_through_router, cfg.impl)
        setattr(parent, child, moe.train(target.training))  # a new module defaults to train mode: follow the model
    return names


def remove_moe_lora(model: nn.Module) -> list[str]:
    """Put the base linears back (undo `inject_moe_lora`); return the names restored."""
    names = list(moe_modules(model))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base)
    return names


def set_moe_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every MoE-LoRA module of `model` on or off without removing it."""
    for m in moe_modules(model).values():
        m.enabled = enabled


def set_router_noise(model: nn.Module, std: float) -> None:
    """Set router noise on every module (keep 0 for rollouts: GSPO needs identical routing in rollout and update)."""
    for m in moe_modules(model).values():
        m.router_noise = std


def set_merged_experts(model: nn.Module, on: bool) -> None:
    """Let (or stop) every MoE-LoRA module's top-1 inference run through per-expert merged weights where that is
    cheap (see `MoELoRALinear.merge_experts`); `adapters.fuse_lora` / `unfuse_lora` call this."""
    for m in moe_modules(model).values():
        m.merge_experts = on
        if not on:
            m.__dict__.pop("_merged_cache", None)   # the copies are rebuilt on the next merged forward


def moe_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable MoE-LoRA weights: each module's router and expert A/B."""
    return [p for m in moe_modules(model).values() for p in (m.router.weight, m.expert_A, m.expert_B)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Mean Switch load-balance loss over the MoE modules' last forward (1 when balanced); 0 when there is none.

    The trainer adds `cfg.load_balance_weight * moe_aux_loss(transformer)` to its loss.
    """
    losses = [m.last_aux_loss for m in moe_modules(model).values() if m.last_aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([x.float() for x in losses]).mean()


def moe_expert_counts(model: nn.Module) -> dict[str, list[int]]:
    """Tokens routed to each expert in the last forward, per module (for logging; syncs with the device)."""
    return {n: m.last_counts.tolist() for n, m in moe_modules(model).items() if m.last_counts is not None}


def moe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name}.router.weight`, `{name}.expert_A`, `{name}.expert_B` for every MoE module (detached, contiguous)."""
    sd = {}
    for name, m in moe_modules(model).items():
        sd[f"{name}.router.weight"] = m.router.weight.detach().contiguous()
        sd[f"{name}.expert_A"] = m.expert_A.detach().contiguous()
        sd[f"{name}.expert_B"] = m.expert_B.detach().contiguous()
    return sd


def load_moe_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy MoE weights in; refuse (UserError, one line) missing or unexpected keys and shapes that do not fit."""
    mods = moe_modules(model)
    expected = {}
    for name, m in mods.items():
        e, r = m.num_experts, m.rank
        expected[f"{name}.router.weight"] = (m.router.weight, (e, m.in_features))
        expected[f"{name}.expert_A"] = (m.expert_A, (e, r, m.in_features))
        expected[f"{name}.expert_B"] = (m.expert_B, (e, r, m.out_features))
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"MoE-LoRA weights do not fit the model: {what} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, (_, shape) in expected.items():
        if tuple(sd[key].shape) != shape:
            raise UserError(f"MoE-LoRA weight {key} has shape {tuple(sd[key].shape)}, the model needs {shape}")
    with torch.no_grad():
        for key, (param, _) in expected.items():
            param.copy_(sd[key].to(device=param.device, dtype=param.dtype))
