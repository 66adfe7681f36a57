"""The one place auxiliary weights are loaded (metric models, SAM 2, Florence-2): a hub id or a local folder/file.

A hub id is loaded the way the Hugging Face libraries load it: `from_pretrained` / `hf_hub_download` download it on
first use (with the libraries' own progress bars) and read the cache afterwards. With HF_HUB_OFFLINE=1 (or
TRANSFORMERS_OFFLINE=1) the same call gets `local_files_only=True`, so only the cache is read. A local folder or file
is used as it is. Every failure to get weights becomes `ModelUnavailable`, a `UserError` whose single line names the
model and how to pass a local copy, so command lines and the app can report the model as missing instead of
crashing or inventing a number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, is_offline_mode

from ..errors import UserError

# Hints to pass a local copy: "--clip-model" (a flag) or "MULTICRAFTER_SAM2" (an environment variable), or several.
Option = str | Sequence[str] | None


class ModelUnavailable(UserError):
    """Weights for a model cannot be found (offline and not cached, a failed download, wrong path, bad files)."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), read at call time: then hub ids come from the local cache only."""
    return bool(is_offline_mode()) or _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hub_kwargs() -> dict[str, Any]:
    """The `local_files_only` every hub load here passes: False (download on first use) unless offline."""
    return {"local_files_only": hub_offline()}


def looks_local(source: str | os.PathLike) -> bool:
    """True when `source` is meant as a path rather than a hub id (exists, absolute, or starts with . or ~)."""
    s = str(source)
    return Path(s).expanduser().exists() or s.startswith(("/", ".", "~")) or s.count("/") > 1


def pass_hint(option: Option, target: str = "/path/to/folder") -> str:
    """'pass --clip-model /path/to/folder' / 'pass MULTICRAFTER_SAM2=/path/to/folder or --sam2 /path/to/folder'."""
    options = [option] if isinstance(option, str) else list(option or [])
    forms = [f"{o} {target}" if o.startswith("-") else f"{o}={target}" for o in options]
    return "pass " + (" or ".join(forms) if forms else f"a local copy ({target})")


def _short(reason: object) -> str:
    return " ".join(str(reason).split())[:160]


def unavailable(what: str, source: str | os.PathLike, option: Option, reason: str,
                target: str = "/path/to/folder") -> ModelUnavailable:
    """One line for a local folder/file that cannot be used: '<what> (<source>) is not available (<reason>); pass ...'."""
    return ModelUnavailable(f"{what} ({source}) is not available ({_short(reason)}); {pass_hint(option, target)}")


def _is_connection_error(exc: BaseException) -> bool:
    """Offline and not cached, as the hub libraries report it (no file locally and no connection to fetch it)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    return any(k in text for k in ("connect", "offline", "local_files_only", "cached files", "local cache"))


def hub_unavailable(what: str, repo: str, option: Option, exc: BaseException,
                    target: str = "/path/to/folder") -> ModelUnavailable:
    """One line for a hub id that could not be loaded: not cached while offline, or a failed download."""
    hint = pass_hint(option, target)
    if hub_offline() or _is_connection_error(exc):
        return ModelUnavailable(f"{what} ({repo}) is not available offline: run once online or {hint}")
    return ModelUnavailable(f"{what} ({repo}) could not be downloaded ({type(exc).__name__}: {_short(exc)}); "
                            f"check the id, or {hint}")


def load_pretrained(cls: Any, source: str | os.PathLike, what: str, option: Option = None, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source)` in eval mode: a hub id downloads on first use (cache only when offline), a
    folder is read as it is; missing weights raise ModelUnavailable (one line)."""
    src = str(source)
    if looks_local(src):
        path = Path(src).expanduser()
        if not path.is_dir():
            raise unavailable(what, src, option, "no such folder")
        if not (path / "config.json").is_file():
            raise unavailable(what, src, option, "folder has no config.json")
        try:
            model = cls.from_pretrained(str(path), **kwargs)
        except Exception as exc:  # noqa: BLE001 - unreadable or mismatched files: one line for the user
            raise unavailable(what, src, option, f"{type(exc).__name__}: {exc}") from None
    else:
        try:
            model = cls.from_pretrained(src, **{**hub_kwargs(), **kwargs})
        except Exception as exc:  # noqa: BLE001 - not cached, no network, unknown id, gated: one line for the user
            raise hub_unavailable(what, src, option, exc) from None
    if hasattr(model, "eval"):
        model.eval()
    return model


def resolve_file(source: str | os.PathLike, filename: str, what: str, option: Option = None) -> Path:
    """Find a single weights file: a local file, `filename` inside a local folder, or `filename` of a hub repo
    (downloaded on first use; the cache only when offline)."""
    src = str(source)
    target = f"/path/to/{filename}"
    if looks_local(src):
        path = Path(src).expanduser()
        if path.is_file():
            return path
        if path.is_dir() and (path / filename).is_file():
            return path / filename
        reason = f"no file {filename}" if path.is_dir() else "no such file or folder"
        raise unavailable(what, src, option, reason, target)
    try:
        return Path(hf_hub_download(src, filename, **hub_kwargs()))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available here"
        raise hub_unavailable(what, f"{src}/{filename}", option, exc, target) from None


def read_json_config(source: str | os.PathLike, filename: str) -> dict[str, Any] | None:
    """Read an optional JSON file (e.g. preprocessor_config.json) from a folder or a hub repo; None if absent.

    A hub file is fetched like the weights (download on first use, the cache only when offline)."""
    src = str(source)
    path: Path | None = None
    if looks_local(src):
        cand = Path(src).expanduser() / filename
        path = cand if cand.is_file() else None
    else:
        try:
            path = Path(hf_hub_download(src, filename, **hub_kwargs()))
        except Exception:  # noqa: BLE001 - optional file: absent, not cached or unreachable all mean "use defaults"
            path = None
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
