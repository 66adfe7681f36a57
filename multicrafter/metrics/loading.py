"""The one place metric weights are loaded: a Hugging Face hub id or a local folder/file, never a silent download.

No CLIP, DINO or aesthetic weights ship with any package. A hub id is read from the Hugging Face cache only, unless
the user opts in with MULTICRAFTER_ALLOW_DOWNLOAD=1 (`allow_downloads`, the same rule SAM 2 and Florence-2 follow). Every failure to get weights becomes `ModelUnavailable`, a `UserError` whose single line names
the model and how to supply a local copy, so CLIs and the UI can report the metric as missing instead of crashing
or inventing a number.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import hf_hub_download, try_to_load_from_cache

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


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub; without it huggingface_hub retries for about a minute per model offline."""
    if _truthy("HF_HUB_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_cache(repo: str, filename: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def allow_downloads() -> bool:
    """Weights are fetched from the Hub only when asked (MULTICRAFTER_ALLOW_DOWNLOAD=1) and HF_HUB_OFFLINE is off."""
    return os.environ.get("MULTICRAFTER_ALLOW_DOWNLOAD", "").strip() == "1" and not _truthy("HF_HUB_OFFLINE")


NOT_CACHED = "not in the Hugging Face cache and downloads are off (MULTICRAFTER_ALLOW_DOWNLOAD=1 allows them)"


def _offline_kwargs(repo: str, filename: str, what: str, option: str | None) -> dict[str, Any]:
    """Hub id: the cache only (local_files_only), or fail now with the one-line message; with the opt-in and a
    reachable hub, a normal (downloading) load."""
    if allow_downloads() and hub_reachable():
        return {}
    if _in_cache(repo, filename):
        return {"local_files_only": True}
    reason = NOT_CACHED if not allow_downloads() else "offline and not in the Hugging Face cache"
    raise unavailable(what, repo, option, reason)


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
    else:
        kwargs = {**_offline_kwargs(src, "config.json", what, option), **kwargs}
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
        return Path(hf_hub_download(src, filename, **_offline_kwargs(src, filename, what, option)))
    except ModelUnavailable as exc:
        raise ModelUnavailable(str(exc).replace(f"'{src}'", f"'{src}/{filename}'")) from None
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower()
        reason = "offline and not in the Hugging Face cache" if offline else f"{type(exc).__name__}: {exc}"
        raise unavailable(what, f"{src}/{filename}", option, reason) from None


def read_json_config(source: str | os.PathLike, filename: str) -> dict[str, Any] | None:
    """Read an optional JSON file (e.g. preprocessor_config.json) from a folder or the hub cache; None if absent."""
    src = str(source)
    path: Path | None = None
    if looks_local(src):
        cand = Path(src).expanduser() / filename
        path = cand if cand.is_file() else None
    else:
        try:
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
