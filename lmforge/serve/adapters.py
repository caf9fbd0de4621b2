"""LoRA adapters served on one base model: `lmforge serve BASE --lora NAME=DIR [--lora NAME2=DIR2 ...]`.

As vLLM's `--lora-modules name=path`: a request whose `model` is NAME runs with that adapter, one
naming the base (its served name) with none, and all of them share one continuous batch (the
scheduler sets each row's adapter, infer/scheduler.py). `lora_modules` checks the flags before the
server binds its port; `load_lora_modules` puts the adapters on the loaded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.interop.peft import load_adapter, read_adapter_config
from lmforge.nn.lora import set_adapter


def lora_modules(specs: Sequence[str], served_model_name: str) -> dict[str, str]:
    """{NAME: DIR} of `--lora NAME=DIR` flags, each checked: the syntax, a name given once and not
    the base's own, a LoRA adapter directory (adapter_config.json) that trains no module in full."""
    modules: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise LMForgeError(f"--lora expects NAME=DIR (the model name requests send, then the adapter "
                               f"directory), got '{spec}'")
        if name in modules:
            raise LMForgeError(f"--lora: the name '{name}' is given twice")
        if name == served_model_name:
            raise LMForgeError(f"--lora: '{name}' is the base model's served name; give the adapter another name")
        if not Path(directory).is_dir():
            raise LMForgeError(f"--lora {name}: adapter directory not found: {directory}")
        try:
            config = read_adapter_config(directory)
        except LMForgeError as e:
            raise LMForgeError(f"--lora {name}: {e}") from None
        if config.get("modules_to_save"):  # they would replace the base's modules for every request
            raise LMForgeError(f"--lora {name}: the adapter trains {', '.join(config['modules_to_save'])} in full "
                               "(modules_to_save), which cannot share the base with other requests; merge it into "
                               "the base and serve that")
        modules[name] = directory
    return modules


def load_lora_modules(model: torch.nn.Module, modules: dict[str, str]) -> None:
    """Add every adapter to `model` under its served name (each checked against the model: an adapter
    for another base is an error naming it); the base alone acts until a request picks one."""
    for name, directory in modules.items():
        try:
            load_adapter(model, directory, name=name)
        except LMForgeError as e:
            raise LMForgeError(f"--lora {name}: {e}") from None
    set_adapter(model, None)
