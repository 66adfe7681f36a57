"""Where an adapter comes from: a named adapter of the model, a local path, or a Hugging Face Hub repository.

`resolve_adapter` turns what a user typed into an adapter folder that `adapters.load_adapter` reads. The rule, first
match wins:
  1. a named adapter of the model folder (`<model>/adapters/NAME`, e.g. the toy model's `ippo`);
  2. an existing local path: an adapter folder, a folder holding one UNO LoRA file, or a `.safetensors` file;
  3. a Hub id `owner/name`, optionally `owner/name@revision`, optionally followed by a subfolder or a file
     (`owner/name/sub/folder`, `owner/name/file.safetensors`), downloaded with huggingface_hub (its own progress
     bars, its own cache; `HF_HUB_OFFLINE=1`, read at call time, keeps it to the local cache).
What a source holds is recognised by its keys, whatever the repository or file is called: a MultiCrafter adapter
folder or a diffusers/peft LoRA (`transformer.<module>.lora_A.weight`) loads as is; UNO's LoRA format
(`double_blocks.{i}.processor.qkv_lora1.down.weight`, ...) is converted once with `convert_uno.convert` and the
result cached under `~/.cache/multicrafter/adapters/` (or `$MULTICRAFTER_ADAPTER_CACHE`), written atomically, so
later loads read the cached folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from torch import nn

from .adapters import _LORA_KEY, CONFIG_FILE, LORA_FILE
from .errors import UserError, one_line
from .metrics.loading import hub_offline

CACHE_ENV = "MULTICRAFTER_ADAPTER_CACHE"
# owner/name, optional @revision, optional /sub/path; owner and name as the Hub allows them.
_HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?:/(?P<sub>[\w./-]+))?$")
def adapter_cache_dir() -> Path:
    """Where converted adapters are kept: `$MULTICRAFTER_ADAPTER_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`, then
    `multicrafter/adapters`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "multicrafter" / "adapters"


# ------------------------------------------------------------------------------------------------ recognising files


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read {path.name} as safetensors ({one_line(exc)[:120]})") from None


def is_uno_lora(keys: list[str]) -> bool:
    """Every key is one of UNO's LoRA keys (`{double,single}_blocks.{i}.processor.<lora>.{down,up}.weight`)."""
    from .convert_uno import parse_uno_key

    return bool(keys) and all(parse_uno_key(k) is not None for k in keys)


def is_diffusers_lora(keys: list[str]) -> bool:
    """Every key is a diffusers/peft LoRA key on the transformer (`transformer.<module>.lora_A.weight`)."""
    return bool(keys) and all(_LORA_KEY.match(k) for k in keys)


# ------------------------------------------------------------------------------------------------ conversion cache


def _cache_key(path: Path, label: str) -> str:
    """A cache folder name that changes when the source file does: a Hub snapshot path holds the commit; a local
    file is keyed by its absolute path, size and modification time."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return re.sub(r"[^\w.-]+", "--", label).strip("-") + "--" + digest


def converted_uno_adapter(path: Path, base: nn.Module, label: str) -> Path:
    """The adapter folder converted from UNO LoRA file `path`: from the cache, else converted now and cached."""
    from . import convert_uno

    target = adapter_cache_dir() / _cache_key(path, label)
    if (target / CONFIG_FILE).is_file():
        return target
    print(f"converting UNO LoRA {label} to a MultiCrafter adapter (once; cached in {target})", flush=True)
    return convert_uno.convert(path, target, base, source=label)


def _linked_lora(path: Path, label: str) -> Path:
    """A diffusers LoRA file under another name: a cache folder whose pytorch_lora_weights.safetensors links to it."""
    target = adapter_cache_dir() / _cache_key(path, label)
    link = target / LORA_FILE
    if not link.exists():
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{LORA_FILE}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.resolve())
        os.replace(tmp, link)
    return target


def _from_file(path: Path, base: nn.Module, label: str) -> Path:
    keys = safetensors_keys(path)
    if is_uno_lora(keys):
        return converted_uno_adapter(path, base, label)
    if is_diffusers_lora(keys):
        return path.parent if path.name == LORA_FILE else _linked_lora(path, label)
    raise UserError(f"{label}: {path.name} is neither a diffusers LoRA (transformer.<module>.lora_A.weight) nor "
                    f"UNO's LoRA format (double_blocks.<i>.processor.qkv_lora1.down.weight, ...)")


def _from_folder(folder: Path, base: nn.Module, label: str) -> Path:
    """An adapter folder as is; else the folder's one LoRA file (UNO's format: converted; diffusers': linked)."""
    if (folder / CONFIG_FILE).is_file() or (folder / LORA_FILE).is_file():
        return folder
    keys = {f: safetensors_keys(f) for f in sorted(folder.glob("*.safetensors"))}
    loras = [f for f, k in keys.items() if is_uno_lora(k) or is_diffusers_lora(k)]
    if len(loras) == 1:
        return _from_file(loras[0], base, f"{label}/{loras[0].name}")
    if len(loras) > 1:
        raise UserError(f"{label} holds several LoRA files ({', '.join(f.name for f in loras)}): name one, "
                        f"e.g. {label}/{loras[0].name}")
    raise UserError(f"{label} is not an adapter: no {CONFIG_FILE}, no {LORA_FILE} and no LoRA file in UNO's or "
                    "diffusers' format")


# ------------------------------------------------------------------------------------------------ the Hub


def parse_hub_id(text: str) -> tuple[str, str | None, str] | None:
    """`owner/name[@revision][/sub/path]` -> (repo id, revision or None, sub path or ""); None if it is not one."""
    if text.startswith((".", "/", "~")) or "\\" in text or "//" in text:
        return None
    m = _HUB_ID.match(text)
    if m is None or ".." in text.split("/"):
        return None
    return m["repo"], m["rev"], (m["sub"] or "").strip("/")


def _download(repo: str, revision: str | None, sub: str) -> Path:
    """The snapshot path of `sub` (a file or folder) in a Hub repository, downloading what is missing."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    shown = repo + (f"@{revision}" if revision else "") + (f"/{sub}" if sub else "")
    try:
        if sub.endswith(".safetensors"):
            return Path(hf_hub_download(repo, sub, revision=revision, local_files_only=offline))
        prefix = f"{sub}/" if sub else ""
        root = snapshot_download(repo, revision=revision, local_files_only=offline,
                                 allow_patterns=[f"{prefix}*.safetensors", f"{prefix}*.json"],
                                 ignore_patterns=[f"{prefix}*/*"])
        return Path(root) / sub if sub else Path(root)
    except LocalEntryNotFoundError:
        if offline:
            raise UserError(f"adapter {shown} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: run once "
                            f"online or `hf download {repo}`, or pass a local folder") from None
        raise UserError(f"adapter {shown} could not be downloaded (the Hub cannot be reached and it is not in the "
                        f"local cache): check the connection, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise UserError(f"adapter '{shown}' not found: not a named adapter of this model, not a local path, and "
                        f"no Hugging Face repository {repo} (private repositories need `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UserError(f"adapter {shown}: repository {repo} has no revision {revision}") from None
    except EntryNotFoundError:
        raise UserError(f"adapter {shown}: repository {repo} has no file {sub}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"adapter {shown} could not be downloaded: {one_line(exc)[:200]}") from None


# ------------------------------------------------------------------------------------------------ the rule


def resolve_adapter(name_or_path: str | os.PathLike, base: nn.Module, model_dir: str | os.PathLike | None = None
                    ) -> Path:
    """The adapter folder for a named adapter, a local path or a Hub id (see the module docstring for the order).

    `base` is the transformer the adapter is for: a UNO LoRA is checked against its shapes when converted. Anything
    that cannot be resolved raises `UserError` with one line saying why.
    """
    text = str(name_or_path).strip()
    if not text:
        raise UserError("adapter name or path is empty")
    if model_dir is not None and "/" not in text and (Path(model_dir) / "adapters" / text).is_dir():
        return Path(model_dir) / "adapters" / text
    local = Path(text).expanduser()
    if local.is_dir():
        return _from_folder(local, base, str(local))
    if local.is_file():
        return _from_file(local, base, str(local))
    hub = parse_hub_id(text)
    if hub is None:
        raise UserError(f"adapter '{text}' not found (not a named adapter of this model, not a local path, and not "
                        "a Hub id like owner/name)")
    repo, revision, sub = hub
    path = _download(repo, revision, sub)
    # The snapshot folder holds the commit, so a new revision of the repository converts again.
    label = f"{repo}@{_commit_of(path)}" + (f"/{sub}" if sub else "")
    if path.is_file():
        return _from_file(path, base, label)
    if not path.is_dir():
        raise UserError(f"adapter {text}: nothing at {sub or 'the repository root'} in {repo}")
    return _from_folder(path, base, label)


def _commit_of(path: Path) -> str:
    """The commit hash in a Hub snapshot path (`.../snapshots/<commit>/...`), short; `local` outside a snapshot."""
    parts = path.parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1][:12]
    return "local"


__all__ = ["adapter_cache_dir", "converted_uno_adapter", "is_diffusers_lora", "is_uno_lora",
           "parse_hub_id", "resolve_adapter", "safetensors_keys"]
