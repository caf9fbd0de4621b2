"""`lmforge merge BASE ADAPTER --out DIR`: a LoRA adapter folded into its base, as a plain model directory.

Every adapted linear becomes base + scaling * B A (nn/lora.merge_lora), so the output loads, serves,
quantises and exports (`convert --to-hf`) like any full-precision model and needs no adapter at run
time. ADAPTER is an adapter directory (PEFT's format, from lmforge or PEFT) or a LoRA training run.
A quantised base is merged only with `--dequantize`: its integer weights become fp32 (base values
as the kernels see them), since folding a float update into int4/int8 weights would round it away.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.interop.files import TempDir, check_out
from lmforge.interop.hf import convert_from_hf, is_hf_dir
from lmforge.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir, load_adapter
from lmforge.models.registry import load_model_dir
from lmforge.nn.lora import merge_lora
from lmforge.nn.quant import dequantize_model, quantization_of

NOT_COPIED = {ckpt_io.MODEL_WEIGHTS, ckpt_io.MODEL_CONFIG, ckpt_io.TRAIN_STATE_TENSORS, ckpt_io.TRAIN_STATE_JSON,
              ckpt_io.BEST_EVAL, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
IMPORTED = ".fp-import"


def adapter_dir_of(path: str | Path) -> Path:
    """The adapter directory of `path`: itself, or the latest checkpoint of a LoRA training run."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"adapter not found: {path}")
    if is_adapter_dir(path):
        return path
    try:
        ckpt = ckpt_io.resolve_model_dir(path)
    except LMForgeError:
        ckpt = None
    if ckpt is not None and is_adapter_dir(ckpt):
        return ckpt
    raise LMForgeError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG}) nor a LoRA training run")


def merge_adapter_dir(base: str | Path, adapter: str | Path, out: str | Path, dequantize: bool = False,
                      overwrite: bool = False) -> Path:
    """Write `base` with `adapter` merged into its weights to `out` (atomic: nothing on error)."""
    base, out = Path(base), Path(out)
    if not base.exists():
        raise LMForgeError(f"checkpoint not found: {base}")
    adapter_dir = adapter_dir_of(adapter)
    check_out(out, overwrite, base)
    check_out(out, overwrite, adapter_dir)
    with TempDir(out) as tmp:
        model_dir = convert_from_hf(base, tmp / IMPORTED) if is_hf_dir(base) else ckpt_io.resolve_model_dir(base)
        model, _, _ = load_model_dir(model_dir)
        qc = quantization_of(model)
        if qc is not None and not dequantize:
            raise LMForgeError(f"{base} is quantised ({qc.scheme}): merging would round the adapter away; pass "
                               "--dequantize to merge into fp32 weights (then `lmforge quantize` the result)")
        load_adapter(model, adapter_dir)
        merge_lora(model)
        if qc is not None:
            dequantize_model(model)
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copyfile(f, tmp / f.name)
        ckpt_io.write_model_dir(tmp, model)
        shutil.rmtree(tmp / IMPORTED, ignore_errors=True)
    return out
