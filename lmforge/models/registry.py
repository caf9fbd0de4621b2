"""Model families: a name -> (config class, model class) table.

The loop, checkpoint files, `LLM.load` and interop look a family up here instead of switching on
strings spread around the code. A family module registers itself at import time:

    register_family("encoder", EncoderConfig, Encoder, presets=PRESETS, config_from_preset=config_from_preset)

A model class has a class attribute `family`, an attribute `cfg` (its config dataclass) and
`num_params()`. Optional hooks: `tied_state_keys()` (state-dict keys that share storage with
another tensor and are not saved), `retie()` (re-share them after loading) and `rebuild_buffers()`
(recompute non-persistent buffers, e.g. RoPE tables, after loading onto a device).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    config_from_preset: Callable[..., Any] | None = None


_FAMILIES: dict[str, Family] = {}


def preset_config(config_cls: type, presets: dict[str, dict[str, Any]], name: str | None, overrides: dict[str, Any],
                  what: str = "preset") -> Any:
    """`config_cls` from preset `name` (None: the class defaults) with `overrides` on top; an unknown
    preset names the closest one, an unknown key is refused. Every family's config_from_preset."""
    import dataclasses

    base: dict[str, Any] = {}
    if name is not None:
        if name not in presets:
            near = difflib.get_close_matches(name, list(presets), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise LMForgeError(f"unknown {what} '{name}'{hint}; presets: {', '.join(presets)}")
        base = dict(presets[name])
    base.update({k: v for k, v in overrides.items() if k != "preset"})
    unknown = set(base) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise LMForgeError(f"unknown model keys: {', '.join(sorted(unknown))}")
    return config_cls(preset=name, **base)


def register_family(name: str, config_cls: type, model_cls: type, presets: dict[str, dict[str, Any]] | None = None,
                    config_from_preset: Callable[..., Any] | None = None) -> None:
    _FAMILIES[name] = Family(name, config_cls, model_cls, dict(presets or {}), config_from_preset)


def _load_all() -> None:
    import lmforge.models  # noqa: F401  (imports every family module, which registers itself)


def get_family(name: str) -> Family:
    _load_all()
    if name not in _FAMILIES:
        raise LMForgeError(f"unknown model family '{name}'; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def families() -> dict[str, Family]:
    _load_all()
    return dict(_FAMILIES)


def family_of_preset(preset: str) -> Family:
    """The family whose PRESETS holds `preset` (names are unique across families)."""
    _load_all()
    for fam in _FAMILIES.values():
        if preset in fam.presets:
            return fam
    names = [p for fam in _FAMILIES.values() for p in fam.presets]
    near = difflib.get_close_matches(preset, names, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    raise LMForgeError(f"unknown preset '{preset}'{hint}; presets: {', '.join(names)}")


def all_presets() -> list[tuple[str, Family]]:
    _load_all()
    return [(p, fam) for fam in _FAMILIES.values() for p in fam.presets]
