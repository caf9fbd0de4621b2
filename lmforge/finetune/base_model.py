"""The model a fine-tuning run starts from: loading it, and the files of it that travel into the run
(and every checkpoint) so the result loads, tokenizes and chats like its base."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_base(base: str | Path, method: str, needs: str | None = None, trains: str = "") -> Any:
    """An `LLM` (model in train mode + tokenizer) from an lmforge run/model directory or a Hugging
    Face folder; `needs` is what its model must be able to do (a task of the family registry, e.g.
    "continue" for a language model), `trains` says in words which models the method trains."""
    from lmforge.infer.llm import LLM
    from lmforge.nn.lora import has_lora, merge_lora

    llm = LLM.load(base)
    if needs is not None and needs not in llm.tasks:
        raise LMForgeError(f"--base {base} is a {llm.family.name} model; lmforge finetune {method} trains {trains}")
    if llm.tokenizer is None:
        raise LMForgeError(f"--base {base} has no tokenizer (tokenizer.json); lmforge finetune {method} reads text")
    if has_lora(llm.model):  # a LoRA run as the base: its adapter folded in, so a new run starts from plain weights
        merge_lora(llm.model)
    llm.model.train()
    return llm


def recorded_base(base: str | Path) -> str:
    """The absolute path a LoRA run records as its base: a run's latest checkpoint (the run may train
    on), else the folder itself."""
    from lmforge.checkpoint import CKPT_DIR, resolve_model_dir

    base = Path(base)
    return str((resolve_model_dir(base) if (base / CKPT_DIR).is_dir() else base).resolve())


def pad_id_of(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0."""
    pid = getattr(tokenizer, "pad_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_id", None)
    return int(pid or 0)


def base_files_dir(base: str | Path) -> Path:
    """The folder holding the base model's own files: a sentence-transformers folder's transformer
    module, a Hugging Face folder, or an lmforge run's latest checkpoint."""
    base = Path(base)
    if (base / "modules.json").is_file():
        from lmforge.interop.encoder import sentence_transformers_layout

        return sentence_transformers_layout(base)[0]
    if (base / "config.json").is_file():
        return base
    from lmforge.checkpoint import resolve_model_dir

    return resolve_model_dir(base)


def copied_files(base: str | Path, names: Sequence[str]) -> dict[str, bytes]:
    """The base's files of these names (those it has), plus its Hugging Face config as hf_config.json."""
    d = base_files_dir(base)
    files = {name: (d / name).read_bytes() for name in names if (d / name).is_file()}
    return {**files, **_hf_config(d)}


def chat_model_files(llm: Any, base: str | Path) -> dict[str, bytes]:
    """A decoder's tokenizer as the run uses it (chat tokens it gained included): tokenizer.json,
    tokenizer_config.json (chat template inside, the base's other settings kept), chat_template.jinja,
    generation_config.json (EOS and end-of-turn ids), plus the base's Hugging Face config."""
    tok = llm.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp) / "tokenizer.json")
        files = {"tokenizer.json": (Path(tmp) / "tokenizer.json").read_bytes()}
    d = base_files_dir(base)
    conf = {**_json_or_empty(d / "tokenizer_config.json"), **tok.tokenizer_config(),
            "model_max_length": llm.model.cfg.block_size}
    files["tokenizer_config.json"] = json.dumps(conf, indent=2, ensure_ascii=False).encode()
    if tok.chat_template:
        files["chat_template.jinja"] = tok.chat_template.encode()
    gen = _json_or_empty(d / "generation_config.json")
    stop = sorted(tok.stop_ids)
    if stop:
        gen["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    if tok.pad_id is not None:
        gen["pad_token_id"] = tok.pad_id
    files["generation_config.json"] = json.dumps(gen, indent=2).encode()
    return {**files, **_hf_config(d)}


def _hf_config(d: Path) -> dict[str, bytes]:
    """The Hugging Face config a converted model keeps beside its own (hf_config.json, or config.json)."""
    for src in (d / "hf_config.json", d / "config.json"):
        if src.is_file():
            return {"hf_config.json": src.read_bytes()}
    return {}


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
