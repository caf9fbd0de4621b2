"""Named shapes: every family's `config_from_preset` is `preset_config` over its own PRESETS table,
and `lmforge info` describes a shape with `describe_shape` (plus what a family adds)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from lmforge.errors import LMForgeError


def unknown_name(kind: str, name: str, known: list[str], listing: str = "presets") -> LMForgeError:
    """"unknown preset 'gpt' (did you mean 'gpt2'?); presets: ..." for any table of names."""
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return LMForgeError(f"unknown {kind} '{name}'{hint}; {listing}: {', '.join(known)}")


def preset_config(config_cls: type, presets: dict[str, dict[str, Any]], name: str | None, overrides: dict[str, Any],
                  what: str = "preset") -> Any:
    """`config_cls` from preset `name` (None: the class defaults) with `overrides` on top; an unknown
    preset names the closest one, an unknown key is refused."""
    base: dict[str, Any] = {}
    if name is not None:
        if name not in presets:
            raise unknown_name(what, name, list(presets))
        base = dict(presets[name])
    base.update({k: v for k, v in overrides.items() if k != "preset"})
    unknown = set(base) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise LMForgeError(f"unknown model keys: {', '.join(sorted(unknown))}")
    return config_cls(preset=name, **base)


def describe_shape(cfg: Any, seq_len: int | None = None, extra: dict[str, Any] | None = None,
                   extra_lines: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(info JSON, text lines) of `lmforge info`: exact parameters, training FLOPs per token at
    `seq_len` (default the context), shape; `extra` / `extra_lines` are a family's additions."""
    seq = seq_len or cfg.block_size
    info: dict[str, Any] = {"params": cfg.num_params(), **(extra or {}), "seq_len": seq,
                            "flops_per_token_train": cfg.flops_per_token(seq)}
    lines = [f"parameters             {info['params']:,}  ({info['params'] / 1e6:,.2f}M)", *(extra_lines or []),
             f"FLOPs / token (train)  {info['flops_per_token_train']:,}  (T={seq})",
             f"shape                  {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, "
             f"vocab {cfg.vocab_size}, context {cfg.block_size}"]
    return info, lines


def shape_row(name: str, cfg: Any, family: str) -> str:
    """One line of `lmforge info --list`: preset, parameters, layers, heads, width, context, family."""
    return (f"{name:<16} {cfg.num_params():>14,} {cfg.n_layer:>6} {cfg.n_head:>5} {'':>3} {cfg.n_embd:>6} "
            f"{cfg.block_size:>6}  {family}")
