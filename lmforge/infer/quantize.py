"""`lmforge quantize MODEL --scheme int8|int4 --out DIR`: a quantised copy of a model directory.

The output is an ordinary model directory (model_config.json records the scheme, model.safetensors
holds the integer weights and scales) with the source's tokenizer and other files, so generate,
chat, serve, eval and info load it as they load any model. A Hugging Face folder is imported first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.interop.files import TempDir, check_out
from lmforge.interop.hf import convert_from_hf, is_hf_dir
from lmforge.models.registry import load_model_dir
from lmforge.nn.quant import QuantConfig, quantize_model

# Files of a source directory that describe its fp weights or its training, not the quantised model.
NOT_COPIED = {ckpt_io.MODEL_WEIGHTS, ckpt_io.MODEL_CONFIG, ckpt_io.TRAIN_STATE_TENSORS, ckpt_io.TRAIN_STATE_JSON,
              ckpt_io.BEST_EVAL}
IMPORTED = ".fp-import"  # where a Hugging Face folder is imported, inside the temporary output


def quantize_model_dir(source: str | Path, out: str | Path, qc: QuantConfig, overwrite: bool = False) -> Path:
    """Write `source` (run, model directory or Hugging Face folder) quantised with `qc` to `out` (atomic)."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise LMForgeError(f"checkpoint not found: {source}")
    check_out(out, overwrite, source)
    with TempDir(out) as tmp:
        model_dir = convert_from_hf(source, tmp / IMPORTED) if is_hf_dir(source) else ckpt_io.resolve_model_dir(source)
        model, _, _ = load_model_dir(model_dir)
        quantize_model(model, qc)
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copyfile(f, tmp / f.name)
        ckpt_io.write_model_dir(tmp, model)
        shutil.rmtree(tmp / IMPORTED, ignore_errors=True)
    return out
