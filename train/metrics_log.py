"""metrics.jsonl: one JSON object per logged step, written by the trainers and read live by the app's Train tab.

Which steps are logged (`LogSchedule`): every `log_every`-th step and the schedule's last step, and also every step of
a short run and the step a run stops at, so a run of any length leaves a curve. The extra records of a run stopped by
`--max-steps` are dropped when it is resumed, so a resumed run's file equals an uninterrupted one's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multicrafter.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
# A run that stops at or before this step logs every step: a short run from the Train tab (e.g. `--max-steps 6` of a
# config with log_every 10) still draws a curve.
SHORT_RUN_STEPS = 50


@dataclass(frozen=True)
class LogSchedule:
    """Which steps one invocation logs. `horizon` is the config's max_steps, `stop` the step this invocation stops at
    (`--max-steps`, else the horizon).

    Resuming with `keep=schedule.due` keeps exactly the earlier records an uninterrupted run to `stop` would hold:
    whatever an earlier invocation logged beyond its schedule (its stop step, its short-run steps) is dropped unless
    this invocation would log that step too."""

    every: int
    horizon: int
    stop: int

    def due(self, step: int) -> bool:
        every = max(1, self.every)
        if self.stop <= SHORT_RUN_STEPS or every > self.horizon:
            return True
        return step % every == 0 or step in (self.horizon, self.stop)


class MetricsLogger:
    """Appends one JSON object per line to OUTPUT/metrics.jsonl, flushed and fsynced per line.

    `resume_step=None` starts a fresh file; `resume_step=k` keeps only lines with step <= k for which `keep(step)` is
    true (lines a killed run wrote after its last checkpoint are dropped, so a resumed run's file equals an
    uninterrupted one's). `enabled=False` (non-main processes) writes nothing.
    """

    def __init__(self, output_dir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True,
                 keep: Callable[[int], bool] | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self.truncate_after(resume_step, keep)
        self._fh = open(self.path, "a", encoding="utf-8")

    def truncate_after(self, step: int, keep: Callable[[int], bool] | None = None) -> None:
        """Rewrite the file keeping lines with step <= `step` (and `keep(step)`); a torn last line is dropped."""
        kept = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict):
                    continue
                s = int(rec.get("step", 0))
                if s <= step and (keep is None or keep(s)):
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All records of OUTPUT/metrics.jsonl; a line being written (torn), a bad line or a non-object is skipped, so
    the app can read the file of a running job."""
    p = Path(output_dir) / METRICS_FILE
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


__all__ = ["METRICS_FILE", "SHORT_RUN_STEPS", "LogSchedule", "MetricsLogger", "read_metrics"]
