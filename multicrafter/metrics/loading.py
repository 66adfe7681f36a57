"""The one place metric weights are loaded: a Hugging Face hub id or a local folder/file, never a silent download.

No CLIP, DINO or aesthetic weights ship with any package, and offline a hub id only works if it is already in the
Hugging Face cache. Every failure to get weights becomes `ModelUnavailable`, a `UserError` whose single line names
the model and how to supply a local copy, so CLIs and the UI can report the metric as missing instead of crashing
or inventing a number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError


class ModelUnavailable(UserError):
    """Weights for a metric model cannot be found (offline, not cached, wrong path, unreadable files)."""


def looks_local(source: str | os.PathLike) -> bool:
    """True when `source` is meant as a path rather than a hub id (exists, absolute, or starts with . or ~)."""
    s = str(source)
    return Path(s).expanduser().exists() or s.startswith(("/", ".", "~")) or s.count("/") > 1


def _hint(what: str, option: str | None) -> str:
    flag = f" with {option} DIR" if option else ""
    return f"download it where there is network (e.g. `hf download ID --local-dir DIR`) and pass the folder{flag}"


def unavailable(what: str, source: str | os.PathLike, option: str | None, reason: str) -> ModelUnavailable:
    """Build the one-line error for a model that cannot be loaded."""
    reason = " ".join(str(reason).split())[:160]
    return ModelUnavailable(f"{what} model '{source}' is unavailable ({reason}); {_hint(what, option)}")


def load_pretrained(cls: Any, source: str | os.PathLike, what: str, option: str | None = None, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source)` in eval mode; missing/offline weights raise ModelUnavailable (one line)."""
    src = str(source)
    if looks_local(src):
        path = Path(src).expanduser()
        if not path.is_dir():
            raise unavailable(what, src, option, "no such folder")
        if not (path / "config.json").is_file():
            raise unavailable(what, src, option, "folder has no config.json")
        src = str(path)
    try:
        model = cls.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower()
        reason = "offline and not in the Hugging Face cache" if offline and not looks_local(src) else str(exc)
        raise unavailable(what, source, option, reason) from None
    if hasattr(model, "eval"):
        model.eval()
    return model


def resolve_file(source: str | os.PathLike, filename: str, what: str, option: str | None = None) -> Path:
    """Find a single weights file: a local file, `filename` inside a local folder, or `filename` of a hub repo."""
    src = str(source)
    if looks_local(src):
        path = Path(src).expanduser()
        if path.is_file():
            return path
        if path.is_dir() and (path / filename).is_file():
            return path / filename
        raise unavailable(what, src, option, f"no file {filename}" if path.is_dir() else "no such file or folder")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(src, filename))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower()
        reason = "offline and not in the Hugging Face cache" if offline else f"{type(exc).__name__}: {exc}"
        raise unavailable(what, f"{src}/{filename}", option, reason) from None


def read_json_config(source: str | os.PathLike, filename: str) -> dict[str, Any] | None:
    """Read an optional JSON file (e.g. preprocessor_config.json) from a folder or the hub cache; None if absent."""
    import json

    src = str(source)
    path: Path | None = None
    if looks_local(src):
        cand = Path(src).expanduser() / filename
        path = cand if cand.is_file() else None
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(src, filename)
            path = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - optional file
            path = None
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
