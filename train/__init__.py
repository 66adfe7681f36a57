"""Training: pre-training (`python -m train.pretrain`) and IPPO post-training (`python -m train.ippo`).

The recipes: `pretrain` (data -> model with adapter -> L = L_diff + λ·L_attn -> step -> checkpoint; configs in
`pretrain_config`), `ippo` (rollout -> reward -> GSPO update -> checkpoint; prompts and rewards in `ippo_inputs`),
`vae` (the toy model's VAE). Building a base from scratch (the toy): `toy_base`; assembling the toy folder:
`assemble_toy`. What the runs share: `config` (YAML -> dataclasses, --set, the command line), `run_setup`
(accelerator, output-folder lock, resume point, model loading), `run_lock`, `checkpoints` (atomic checkpoints, RNG
state), `optim` (AdamW, LR schedule, EMA), `metrics_log` (metrics.jsonl), `data` (datasets -> encoded batches).
"""
