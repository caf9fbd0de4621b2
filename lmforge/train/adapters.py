"""LoRA / QLoRA in the one training loop: the `lora` config section and what the loop does with it.

With `lora.r` set, the Trainer (loop.py) takes the job's model, quantises it (`lora.quantize`, QLoRA:
the base stays quantised and frozen), puts adapter "default" on the linears `lora.targets` names
(nn/lora.py) and trains only the adapters plus `lora.modules_to_save` and the job's fresh heads
(`TrainJob.head_modules`: a classifier's or reward model's score, PPO's value head). Checkpoints hold
only those tensors: the model directory is an adapter directory (`write_adapter_model`) that names
its base by absolute path (lora_base.json), and the training state keeps the trainable tensors
under their module names for an exact resume. `LLM.load(RUN)` loads base + adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn

from lmforge import checkpoint as ckpt_io
from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, hf_module_rows, save_adapter
from lmforge.nn.lora import DEFAULT_ADAPTER, LoRASettings, add_lora
from lmforge.nn.quant import check_device, quant_config, quantization_of, quantize_model

BASE_DIR = "base"  # RUN/base: the initial model of a LoRA run without a base directory (`lmforge train`)
TRAINABLE = "trainable."  # prefix of the trainable tensors in a LoRA run's train_state.safetensors


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA) instead of full fine-tuning, optionally over a quantised base (QLoRA)."""

    r: Optional[int] = config_field(None, "adapter rank; none = full fine-tuning (every weight trained)")
    alpha: Optional[float] = config_field(None, "the update is scaled by alpha / r (none = r: scaling 1)")
    dropout: float = config_field(0.0, "dropout on the adapters' input")
    targets: str = config_field("all-linear", "all-linear (every linear but the LM head) | comma list of roles "
                                "q,k,v,o,gate,up,down and/or module names, lmforge's or PEFT's for the exported "
                                "HF architecture (q_proj,v_proj; c_attn)")
    use_rslora: bool = config_field(False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r")
    modules_to_save: str = config_field("", "comma list of modules trained in full and saved with the adapter "
                                        "(a method's fresh head, e.g. classify's, always is)")
    quantize: Literal["none", "int8", "int4"] = config_field(
        "none", "QLoRA: load the frozen base quantised (weight-only int8 | int4, CPU kernels) under fp32 adapters")
    group_size: Optional[int] = config_field(None, "int4 group size (32 | 64 | 128; none = 128)")


def lora_settings(cfg: LoRAConfig | None, head_modules: Sequence[str] = ()) -> LoRASettings | None:
    """The adapter the config asks for (None: full fine-tuning); the job's fresh heads trained in full."""
    if cfg is None or cfg.r is None:
        if cfg is not None and cfg.quantize != "none":
            raise LMForgeError(f"lora.quantize {cfg.quantize} trains adapters over a quantised base; set lora.r "
                               "(e.g. --lora.r 16) or remove lora.quantize")
        return None
    if cfg.group_size is not None and cfg.quantize != "int4":
        raise LMForgeError("lora.group_size goes with lora.quantize int4")
    saved = list(dict.fromkeys([*LoRASettings(1, modules_to_save=cfg.modules_to_save).save_list(), *head_modules]))
    return LoRASettings(cfg.r, cfg.alpha, cfg.dropout, cfg.targets, cfg.use_rslora, ",".join(saved))


def prepare_lora(model: nn.Module, cfg: LoRAConfig | None, head_modules: Sequence[str] = (),
                 seed: int = 0, device: str | torch.device = "cpu") -> LoRASettings | None:
    """Quantise `model`'s base (lora.quantize) and add adapter "default", in place; a model that has
    it already is left as it is (DPO prepares its model before the reference pass). The adapters'
    init draws from its own generator seeded by `seed`, wherever this is called."""
    settings = lora_settings(cfg, head_modules)
    if settings is None or DEFAULT_ADAPTER in getattr(model, "lora_settings", {}):
        return settings
    if cfg.quantize != "none" and quantization_of(model) is None:
        qc = quant_config(cfg.quantize, cfg.group_size)
        check_device(qc, device)
        quantize_model(model, qc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(model, settings, aliases=hf_module_rows(model))  # PEFT's names of the modules work too
    return settings


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{TRAINABLE + parameter name: tensor} of every trained tensor (the training state of a LoRA run)."""
    return {TRAINABLE + n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Put the trainable tensors a checkpoint saved back into `model` (bit for bit)."""
    expected = trainable_state(model)
    saved = {k: v for k, v in tensors.items() if k.startswith(TRAINABLE)}
    if set(saved) != set(expected):
        odd = sorted(k[len(TRAINABLE):] for k in set(saved) ^ set(expected))
        raise LMForgeError(f"{source} does not fit this run's adapters (tensors {', '.join(odd[:4])} differ)")
    with torch.no_grad():
        for key, t in saved.items():
            if t.shape != expected[key].shape:
                raise LMForgeError(f"{source}: '{key[len(TRAINABLE):]}' has shape {tuple(t.shape)}, the adapter "
                                   f"expects {tuple(expected[key].shape)}")
            expected[key].copy_(t)


def write_adapter_model(directory: Path, model: nn.Module, base: str) -> None:
    """The weights of a LoRA run's model directory: the adapter (PEFT's files) and the base it goes on."""
    save_adapter(model, directory, base=base)
    ckpt_io.atomic_write_text(directory / ckpt_io.LORA_BASE,
                              json.dumps({"base": base, "adapter": DEFAULT_ADAPTER}, indent=2))


RUN_ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def publish_adapter(checkpoint: Path, run_dir: Path) -> None:
    """The checkpoint's adapter files at the top of the run too, so that PEFT reads the run directory
    (`PeftModel.from_pretrained(model, RUN)`); lmforge's own commands read the latest checkpoint."""
    for name in RUN_ADAPTER_FILES:  # the config last: whoever finds it finds the weights beside it
        ckpt_io.atomic_write_bytes(run_dir / name, (checkpoint / name).read_bytes())
