"""A temporary Hugging Face cache for tests: a saved model folder placed in the hub's cache layout, no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REVISION = "0" * 40


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point the Hugging Face libraries at `cache` (HF_HUB_CACHE, read by huggingface_hub at call time)."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def place_in_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = REVISION) -> Path:
    """Copy `folder` to models--OWNER--NAME/snapshots/<revision>/ with refs/main, as a download would leave it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
