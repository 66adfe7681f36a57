"""MoE-LoRA (DESIGN §4): a per-token top-k mixture of LoRA experts on the FFN linears of the output-side blocks.

    p = Softmax(TopK(W_g h, k))   (the other experts at −∞)
    h_out = base(h) + Σ_i p_i (α/r) B_i A_i h

peft has no trainable per-token top-k LoRA mixture, so the module is written here. B is zero-initialised, so an
injected model starts exactly as the base model. With k = 1 the softmax over one logit is the constant 1, so the
router would get no gradient from the task loss; by default a straight-through term p_full − stopgrad(p_full)
(value 0) is added to the routed gate, which keeps the forward exactly the paper's while the router learns as in
Switch Transformers. Routing is deterministic unless `router_noise` > 0 and the module is in training mode.

Parameter layout (saved as is by `moe_state_dict`): `router.weight` (E, in), `expert_A` (E, r, in),
`expert_B` (E, r, out). The names avoid "lora_" so peft's state-dict helpers never pick them up.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

SINGLE_FFN = ("proj_mlp", "proj_out")
DOUBLE_FFN = ("ff.net.0.proj", "ff.net.2")
IMPLS = ("auto", "dense", "grouped")
DENSE_MAX_EXTRA_RANK = 128  # "auto": compute all experts densely while (E − k)·r stays at or below this


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
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoELoRAConfig:
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
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.scaling = alpha / rank
        self.router_noise = router_noise
        self.straight_through_router = straight_through_router
        self.impl = impl
        self.enabled = True
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=w.device, dtype=w.dtype)
        self.expert_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=w.device, dtype=w.dtype))
        self.expert_B = nn.Parameter(torch.zeros(num_experts, rank, self.out_features, device=w.device, dtype=w.dtype))
        for a in self.expert_A:  # each A like nn.Linear / peft lora_A: kaiming-uniform over its fan-in
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.last_counts: torch.Tensor | None = None  # tokens routed to each expert in the last forward
        self.last_aux_loss: torch.Tensor | None = None  # Switch load-balance loss of the last forward

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, scaling={self.scaling:g}, enabled={self.enabled}")

    def _use_dense(self) -> bool:
        if self.impl != "auto":
            return self.impl == "dense"
        # Dense does (E − k)·r·(in + out) extra multiply-adds per token; grouped instead moves every token's input and
        # output through a gather/scatter and syncs for the group sizes. Both extras scale with in + out, so the
        # break-even is a rank: measured with bench/moe_lora.py (dense wins at (E−k)·r = 48, grouped at 192).
        return (self.num_experts - self.top_k) * self.rank <= DENSE_MAX_EXTRA_RANK

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits → (top-k expert ids (N, k), their gates (N, k), full softmax (N, E))."""
        logits = self.router(h).float()  # route in fp32: bf16 logits tie and round the gates
        if self.training and self.router_noise > 0:
            logits = logits + self.router_noise * torch.randn_like(logits)
        top_val, top_idx = logits.topk(self.top_k, dim=-1)
        gates = top_val.softmax(dim=-1)  # softmax over the kept logits == softmax with the others at −inf
        probs = logits.softmax(dim=-1)
        if self.top_k == 1 and self.straight_through_router:
            g = probs.gather(1, top_idx)
            gates = gates + (g - g.detach())
        return top_idx, gates, probs

    def _dense(self, h: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """All experts in two matmuls (rank E·r), unrouted ones masked to 0; the add is fused into addmm."""
        n, e, r = h.shape[0], self.num_experts, self.rank
        z = F.linear(h, self.expert_A.reshape(e * r, self.in_features)).view(n, e, r)
        w = torch.zeros(n, e, device=h.device, dtype=coef.dtype).scatter(1, idx, coef)
        z = (z * w.unsqueeze(-1)).reshape(n, e * r)
        return torch.addmm(out, z.to(out.dtype), self.expert_B.reshape(e * r, self.out_features).to(out.dtype))

    def _grouped(self, h: torch.Tensor, out: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, one small matmul pair per expert, results added back at their rows."""
        k = self.top_k
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k if k > 1 else order
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # host sync: sizes of the groups
        hs = h.index_select(0, tok).split(counts)  # split/unbind, not slicing: their backward does not zero-fill
        cs = coef.reshape(-1)[order].unsqueeze(-1).split(counts)
        As, Bs = self.expert_A.unbind(0), self.expert_B.unbind(0)
        ys = [((hs[e] @ As[e].t()) * cs[e]) @ Bs[e] for e, c in enumerate(counts) if c]
        return out.index_add_(0, tok, torch.cat(ys).to(out.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        h = x.reshape(-1, self.in_features).to(self.expert_A.dtype)
        idx, gates, probs = self.route(h)
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        self.last_counts = counts.detach()
        if torch.is_grad_enabled():  # Switch: E · Σ_i f_i P_i, f = share of routed assignments, P = mean router prob
            frac = counts.to(probs.dtype) / idx.numel()
            self.last_aux_loss = self.num_experts * (frac * probs.mean(0)).sum()
        else:
            self.last_aux_loss = None
        coef = (gates * self.scaling).to(h.dtype)  # p_i · α/r, applied on the rank-r side (cheaper than on out)
        out2d = out.reshape(-1, self.out_features)
        mix = self._dense if self._use_dense() else self._grouped
        return mix(h, out2d, idx, coef).view(out.shape)


def moe_modules(model: nn.Module) -> dict[str, MoELoRALinear]:
    """All MoE-LoRA modules of `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def inject_moe_lora(model: nn.Module, cfg: MoELoRAConfig) -> list[str]:
    """Replace every `nn.Linear` whose name fully matches the target regex by a `MoELoRALinear`; return the names."""
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
        if type(target) is not nn.Linear:
            raise UserError(f"MoE-LoRA target {name} is a {type(target).__name__}, not a plain nn.Linear "
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
    for m in moe_modules(model).values():
        m.enabled = enabled


def set_router_noise(model: nn.Module, std: float) -> None:
    """Set router noise on every module (keep 0 for rollouts: GSPO needs identical routing in rollout and update)."""
    for m in moe_modules(model).values():
        m.router_noise = std


def moe_parameters(model: nn.Module) -> list[nn.Parameter]:
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
