"""Training configs: YAML -> typed dataclasses, `--set KEY=VALUE` overrides, and the command line every trainer shares.

Why typed: a typo or a wrong type in a config must stop the run at once with one line naming the key, not hours into
a run. Each section's own rules live in its dataclass's `__post_init__`; a UserError raised there is prefixed with the
section's path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from multicrafter.errors import ArgumentParser, UserError, one_line

T = TypeVar("T")



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint; UserError naming `where` on mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected text, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise UserError(f"unknown config key '{where}' (known here: {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise UserError(f"missing required config key '{where}'")
    try:
        return cls(**kwargs)
    except UserError as exc:
        raise UserError(f"{prefix}: {exc}" if prefix else str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad config{' section ' + prefix if prefix else ''}: {one_line(exc)}") from None


def _apply_overrides(data: dict, overrides: dict) -> dict:
    """Merge overrides into the raw YAML mapping: keys may be dotted ('train.lr') or nested dicts."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for key, value in overrides.items():
        node, parts = data, str(key).split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _apply_overrides(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None, cls: type[T], overrides: dict | None = None) -> T:
    """YAML file -> nested dataclasses `cls`, with type checks; unknown keys, wrong types and a missing file are one
    UserError line naming the key. `path=None` builds from defaults (plus overrides)."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', None) or one_line(exc)}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise UserError(f"{p}: the config must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = _apply_overrides(data, overrides)
    try:
        return _build(cls, data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}" if path is not None else str(exc)) from None


def training_parser(prog: str, description: str, config_help: str, output_help: str) -> ArgumentParser:
    """The command line every training script shares: --config, --max-steps, --output-dir, --resume, --set."""
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (a checkpoint is written; the LR schedule keeps train.max_steps)")
    p.add_argument("--output-dir", default=None, help=output_help)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    return p


def parse_set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (values parsed as YAML) -> overrides for `load_config`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: cannot parse value {value!r}") from None
    return out


def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able data (saved beside checkpoints and in metrics headers)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


__all__ = ["config_to_dict", "load_config", "parse_set_overrides", "training_parser"]
