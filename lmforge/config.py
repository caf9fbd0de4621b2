"""Typed configuration: dataclasses are the schema, YAML files and `--section.key value` flags fill them.

A config is a dataclass whose fields are plain values (int, float, str, bool, Optional[...],
dict) or nested dataclasses (the sections). `build(cls, yaml_dict, overrides)` checks every key
against the schema, so a typo fails with the valid keys and the closest match instead of being
ignored, and converts every value to the declared type with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LMForgeError


def config_field(default: Any, help: str) -> Any:
    """A config dataclass field with its default and the help text `--help-config` and the CLI show
    (a list or dict default becomes a factory, so instances never share it)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})

_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "1", "on"}
_FALSE_WORDS = {"false", "no", "0", "off"}


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown_key(key: str, prefix: str, valid: list[str]) -> LMForgeError:
    full = f"{prefix}{key}"
    names = ", ".join(sorted(valid))
    return LMForgeError(f"unknown config key '{full}'{_closest(key, valid)}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {names}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise naming `key`."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise LMForgeError(f"config key '{key}' must not be empty")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise LMForgeError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got '{value}'")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise LMForgeError(f"config key '{key}' must be true or false, got '{value}'")
    if tp is int:
        if isinstance(value, bool):
            raise LMForgeError(f"config key '{key}' must be an integer, got '{value}'")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise LMForgeError(f"config key '{key}' must be an integer, got '{value}'")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LMForgeError(f"config key '{key}' must be a number, got '{value}'")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise LMForgeError(f"config key '{key}' must be a string, got '{value}'")
        return str(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise LMForgeError(f"config key '{key}' must be a mapping, got '{value}'")
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise LMForgeError(f"config key '{key}' must be a list, got '{value}'")
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        items = [coerce(v, elem, key) if elem is not Any else v for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested) dict, checking every key and value type."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise LMForgeError(f"config section '{prefix.rstrip('.')}' must be a mapping")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(key, prefix, list(types_))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise LMForgeError(f"config section '{prefix}{key}' must be a mapping")
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['--train.lr', '3e-4', '--model.n_layer=4'] into a nested dict of strings."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise LMForgeError(f"unexpected argument '{arg}'; overrides look like --section.key VALUE")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LMForgeError(f"override '--{name}' needs a value")
            value = args[i + 1]
            i += 2
        parts = name.replace("-", "_").split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LMForgeError(f"override '--{name}' conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LMForgeError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LMForgeError(f"config file {path} must hold a mapping of sections")
    return data


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field; used by `lmforge train --help-config`."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", getattr(tp, "__name__", str(tp)).replace("typing.", ""), getattr(inst, f.name), f.metadata.get("help", "")))
    return rows
