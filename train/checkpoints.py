"""Checkpoints and RNG state: what a run saves so that `--resume` continues bit-exactly.

Layout: `OUTPUT/checkpoint-{step}/state.pt` (one torch.save'd dict) plus `meta.json` written last. The main process
writes a checkpoint into `checkpoint-{step}.tmp-*` and renames it, so a directory named `checkpoint-{step}` with a
`meta.json` is always complete; anything else (temp dirs, dirs without meta.json) is ignored by `list_checkpoints`.
In a multi-process run only the main process writes, between two barriers (`save_on_main`), and the checkpoint to
resume from is chosen once by the main process and sent to the others (`train.run_setup.resume_point`), so no rank
ever reads a checkpoint that is being written or pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from multicrafter.errors import UserError, one_line
from multicrafter.io import staged_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.pt"
META_FILE = "meta.json"


# ------------------------------------------------------------------------------------------------ checkpoints


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (named checkpoint-N, with meta.json and state.pt), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(output_dir: str | os.PathLike, step: int, state: dict, keep_last: int = 2,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `state` (anything torch.save takes) to OUTPUT/checkpoint-{step} atomically; prune to `keep_last`.

    The temp dir is fully written and fsynced, meta.json last, then renamed; an existing checkpoint of the same step
    is moved aside first, so the name never points at a partial write. `keep_last <= 0` keeps all.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    with staged_dir(final, prefix=f"checkpoint-{step}.tmp-") as tmp:
        torch.save(state, tmp / STATE_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META_FILE).write_text(json.dumps({"step": step}) + "\n")
        _fsync_tree(tmp)
    if keep_last > 0:
        for _, p in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def save_on_main(accelerator: Any, output_dir: str | os.PathLike, step: int, state: dict, keep_last: int) -> None:
    """Every rank calls this with the state it computed; the main process writes it between two barriers, so no rank
    runs ahead while the checkpoint (and its pruning of older ones) is being written."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(output_dir, step, state, keep_last)
    accelerator.wait_for_everyone()


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None; temp and partial dirs never count."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | os.PathLike, resume: bool, is_main: bool = True) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    Why: a second run into a folder that already holds checkpoints would interleave two runs' checkpoints and
    metrics, so without `resume` that is refused; with `resume` and nothing to resume, the run starts at step 0 (the
    main process says so)."""
    if resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None and is_main:
            print(f"--resume: no complete checkpoint in {output_dir}, starting from step 0")
        return ckpt
    if list_checkpoints(output_dir):
        raise UserError(f"{output_dir} already holds checkpoints: pass --resume to continue, or choose another "
                        "--output-dir")
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / META_FILE).read_text())["step"])


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The state dict saved by `save_checkpoint` (our own files, so full unpickling is allowed)."""
    p = Path(path)
    if not (p / STATE_FILE).is_file() or not (p / META_FILE).is_file():
        raise UserError(f"{p} is not a complete checkpoint (no {STATE_FILE} or {META_FILE})")
    try:
        return torch.load(p / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a user-facing problem
        raise UserError(f"cannot read checkpoint {p}: {one_line(exc)}") from None


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states, plus the named torch.Generators the trainer draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`; every named generator must be present in the saved state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise UserError(f"checkpoint has no state for random generator '{name}'")
        g.set_state(saved[name])


def gather_rng_states(accelerator: Any, generators: dict[str, torch.Generator] | None = None) -> list[dict]:
    """Every process's RNG state (index = process rank), so each rank resumes its own random streams."""
    mine = capture_rng_state(generators)
    return [mine] if accelerator.num_processes == 1 else gather_object([mine])


def restore_rank_rng_state(accelerator: Any, saved: list[dict] | dict, where: str | os.PathLike,
                           generators: dict[str, torch.Generator] | None = None) -> None:
    """This rank's part of `gather_rng_states`' list (a single dict: a checkpoint of a one-process run)."""
    states = [saved] if isinstance(saved, dict) else saved
    if len(states) != accelerator.num_processes:
        raise UserError(f"checkpoint {where} was written by {len(states)} process(es); resume it with the same "
                        f"number (now {accelerator.num_processes})")
    restore_rng_state(states[accelerator.process_index], generators)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = [
    "capture_rng_state", "checkpoint_step", "gather_rng_states", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "resolve_resume", "restore_rank_rng_state", "restore_rng_state", "save_checkpoint",
    "save_on_main", "seed_everything",
]
