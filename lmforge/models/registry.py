"""Model families: the one table of what each family is and what it can do.

    FAMILIES["encoder"] -> Family(config and model classes, presets, interop module, capabilities, ...)

Everything that asks "which kind of model is this?" asks here: the training loop and checkpoints
(config and model classes), `LLM.load` and `lmforge convert` (which family a model directory or a
Hugging Face folder holds, and which interop module reads and writes it), `LLM.generate` / `embed` /
`classify` / `score` (capabilities, and the inference module that generates), and `lmforge info`
(how a config describes itself). Nobody else switches on family names.

The table is explicit: no registration by import side effect. A family's interop and generation
modules sit in layers above models/, so the table names them by import path and they are imported
on first use; models/ itself imports nothing above it.

A new family is one model file (config dataclass, PRESETS, the nn.Module, `describe`), one interop
module (the protocol in lmforge/interop/__init__.py) and one entry in FAMILIES below.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from lmforge import checkpoint as ckpt_io
from lmforge.config import from_dict
from lmforge.errors import LMForgeError
from lmforge.models import clip, decoder, encoder, heads, seq2seq
from lmforge.models.presets import describe_shape, preset_config, shape_row, unknown_name
from lmforge.nn.quant import QuantConfig, check_device, quantized_skeleton
from lmforge.tokenizer import Tokenizer

__all__ = ["Family", "FAMILIES", "get_family", "families", "family_of", "family_of_preset", "all_presets",
           "family_of_model_dir", "read_model_config", "read_quantization",
           "build_quantized_model", "build_model", "load_model_dir", "load_tokenizer",
           "preset_config", "model_summary"]

# What a family's models can be asked to do (LLM methods, the CLI and the server check these).
# CONTINUE: generated text continues the prompt (decoders), where an encoder-decoder's is a new target.
GENERATE, CONTINUE, STREAM = "generate", "continue", "stream"
EMBED, CLASSIFY, SCORE, MASKED_LM = "embed", "classify", "score", "masked_lm"
EMBED_IMAGE, ZERO_SHOT = "embed_image", "zero_shot"  # image embeddings; images classified by label texts


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    config_from_preset: Callable[..., Any]
    describe: Callable[[Any, int | None], tuple[dict[str, Any], list[str]]]  # (info JSON, text lines) for `lmforge info`
    list_row: Callable[[str, Any], str]        # one line of `lmforge info --list`
    can: frozenset[str] = frozenset()          # capabilities: the constants above
    tasks_of: Callable[[Any], frozenset[str]] | None = None  # those of one config, when they depend on it
    interop: str | None = None                 # module reading / writing its Hugging Face folders (None: no HF form)
    generation: str | None = None              # inference module with `generate_for_llm(llm, prompt, **options)`
    embedding: str | None = None               # inference module with `embed_for_llm(llm, texts, **options)`
    encoder_tokenizer: bool = False            # its tokenizer frames inputs as [CLS] a [SEP] (roles cls/sep/mask)
    # `lmforge finetune classify`: (model, labels, pooling=, dropout=) -> a classifier on its body (None: cannot)
    as_classifier: Callable[..., torch.nn.Module] | None = None
    max_tokens: Callable[[Any], int] = lambda cfg: int(cfg.block_size)  # longest input its tokenizer makes
    # Extra JSON files of its model directories, loaded onto the model as attributes (None when absent).
    dir_files: dict[str, str] = field(default_factory=dict)

    def tasks(self, cfg: Any) -> frozenset[str]:
        """What a model of this family with config `cfg` can do."""
        return self.can if self.tasks_of is None else self.tasks_of(cfg)

    def interop_module(self) -> ModuleType:
        if self.interop is None:
            raise LMForgeError(f"{self.name} models have no Hugging Face form to import or export")
        return importlib.import_module(self.interop)

    def generation_module(self) -> ModuleType:
        if self.generation is None:
            raise LMForgeError(f"a {self.name} model does not generate text")
        return importlib.import_module(self.generation)

    def embedding_module(self) -> ModuleType:
        if self.embedding is None:
            raise LMForgeError(f"a {self.name} model does not embed text")
        return importlib.import_module(self.embedding)

    def preset_changes(self, cfg: Any) -> list[str] | None:
        """The keys of `cfg` that differ from its preset (`cfg.preset`); vocab_size aside, as it
        follows the tokenizer. None when `cfg` names no preset of this family."""
        name = getattr(cfg, "preset", None)
        if name not in self.presets:
            return None
        start = self.config_from_preset(name, vocab_size=cfg.vocab_size)
        return [f.name for f in dataclasses.fields(cfg)
                if f.name != "preset" and getattr(cfg, f.name) != getattr(start, f.name)]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("decoder", decoder.DecoderConfig, decoder.Decoder, decoder.PRESETS, decoder.config_from_preset,
           decoder.describe, decoder.list_row, frozenset({GENERATE, CONTINUE, STREAM}),
           interop="lmforge.interop.decoder", generation="lmforge.infer.causal", as_classifier=heads.as_classifier,
           dir_files={ckpt_io.GENERATION_FORMAT: "generation_format"}),
    Family("decoder_classifier", heads.DecoderClassifierConfig, heads.DecoderClassifier, {},
           heads.classifier_from_preset, decoder.describe, decoder.list_row, frozenset({CLASSIFY, SCORE}),
           as_classifier=heads.as_classifier),
    Family("decoder_value", heads.DecoderValueConfig, heads.DecoderWithValueHead, {}, heads.value_from_preset,
           decoder.describe, decoder.list_row, frozenset({GENERATE, CONTINUE, STREAM}),
           generation="lmforge.infer.causal"),
    Family("encoder", encoder.EncoderConfig, encoder.Encoder, encoder.PRESETS, encoder.config_from_preset,
           encoder.describe, lambda name, cfg: shape_row(name, cfg, "encoder"), frozenset({EMBED, CLASSIFY, MASKED_LM}),
           tasks_of=lambda cfg: frozenset({EMBED, CLASSIFY} if cfg.head == "sequence" else
                                          {EMBED, MASKED_LM} if cfg.head == "mlm" else {EMBED}),
           interop="lmforge.interop.encoder", embedding="lmforge.infer.embed", encoder_tokenizer=True,
           max_tokens=lambda cfg: int(cfg.block_size - cfg.position_offset),
           dir_files={encoder.SENTENCE_POOLING_FILE: "sentence_pooling"}, as_classifier=encoder.as_classifier),
    Family("seq2seq", seq2seq.Seq2SeqConfig, seq2seq.Seq2Seq, seq2seq.PRESETS, seq2seq.config_from_preset,
           describe_shape, lambda name, cfg: shape_row(name, cfg, "seq2seq"), frozenset({GENERATE}),
           interop="lmforge.interop.seq2seq", generation="lmforge.infer.seq2seq",
           dir_files={ckpt_io.GENERATION_FORMAT: "generation_format"}),
    Family("clip", clip.CLIPConfig, clip.CLIP, clip.PRESETS, clip.config_from_preset, clip.describe, clip.list_row,
           frozenset({EMBED, EMBED_IMAGE, ZERO_SHOT}),
           tasks_of=lambda cfg: frozenset({EMBED} if cfg.parts == "text" else {EMBED_IMAGE} if cfg.parts == "vision"
                                          else {EMBED, EMBED_IMAGE, ZERO_SHOT}),
           interop="lmforge.interop.clip", embedding="lmforge.infer.clip"),
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise LMForgeError(f"unknown model family '{name}'; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def families() -> dict[str, Family]:
    return dict(FAMILIES)


def family_of(model_or_config: Any) -> Family:
    """The family of a model (its `family` attribute) or of a config dataclass."""
    name = getattr(model_or_config, "family", None)
    if isinstance(name, str):
        return get_family(name)
    for fam in FAMILIES.values():  # subclasses first would matter; configs here are exact types
        if type(model_or_config) is fam.config_cls:
            return fam
    raise LMForgeError(f"no model family for {type(model_or_config).__name__}")


def family_of_preset(preset: str) -> Family:
    """The family whose PRESETS holds `preset` (names are unique across families)."""
    for fam in FAMILIES.values():
        if preset in fam.presets:
            return fam
    raise unknown_name("preset", preset, [p for fam in FAMILIES.values() for p in fam.presets])


def all_presets() -> list[tuple[str, Family]]:
    return [(p, fam) for fam in FAMILIES.values() for p in fam.presets]


def model_summary(cfg: Any, n_params: int | None = None) -> str:
    """What a model config is, in one sentence: its family and exact parameter count (`n_params`
    when the model is at hand, else the config's count), and how it relates to the preset its keys
    started from (a run's config.yaml names that preset; `lmforge info --preset NAME` describes it)."""
    family = family_of(cfg)
    n = n_params if n_params is not None else cfg.num_params()
    text = f"{'an' if family.name[0] in 'aeiou' else 'a'} {family.name} of {n:,} parameters ({n / 1e6:,.2f}M)"
    changes = family.preset_changes(cfg)
    if changes is None:
        return text + "."
    if not changes:
        return text + f": preset {cfg.preset} as it is."
    preset_n = family.config_from_preset(cfg.preset, vocab_size=cfg.vocab_size).num_params()
    return (text + f": preset {cfg.preset} ({preset_n / 1e6:,.2f}M alone) is only where its keys started; "
            + ", ".join(changes) + (" differ" if len(changes) > 1 else " differs") + " from it.")


# ---- lmforge model directories -----------------------------------------------------------------
# A model directory is model_config.json ({"family", "config"}), model.safetensors, and optionally
# tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json) and the
# family's own files (dir_files). A run directory resolves to its latest checkpoint.

def family_of_model_dir(path: str | Path) -> Family | None:
    """The family an lmforge run or model directory holds; None when `path` is not one."""
    try:
        directory = ckpt_io.resolve_model_dir(path)
    except LMForgeError:
        return None
    meta = _read_meta(directory) if (directory / ckpt_io.MODEL_CONFIG).is_file() else None
    return get_family(meta["family"]) if meta is not None else None


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = ckpt_io.read_json(directory / ckpt_io.MODEL_CONFIG)
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str) or not isinstance(meta.get("config"), dict):
        raise LMForgeError(f"{directory / ckpt_io.MODEL_CONFIG} is not an lmforge model config")
    return meta


def read_model_config(directory: Path) -> tuple[Family, Any]:
    """(Family, config dataclass) of a model directory's model_config.json."""
    meta = _read_meta(directory)
    family = get_family(meta["family"])
    return family, from_dict(family.config_cls, meta["config"], prefix="model.")


def read_quantization(directory: Path) -> QuantConfig | None:
    """The quantisation a model directory's weights hold (None: full precision)."""
    meta = _read_meta(directory)
    if meta.get("quantization") is None:
        return None
    return QuantConfig.from_json(meta["quantization"], str(directory / ckpt_io.MODEL_CONFIG))


def build_model(family: Family, cfg: Any, device: str | torch.device = "cpu",
                state: dict[str, torch.Tensor] | None = None, source: Path | None = None) -> torch.nn.Module:
    """A model of `family` with config `cfg`; with `state`, its weights (checked) without a random init."""
    if state is None:
        return family.model_cls(cfg).to(device)
    with torch.device("meta"):
        model = family.model_cls(cfg)
    model = model.to_empty(device=device)
    # load_state_checked assigns the given tensors themselves, so they go to the device first
    ckpt_io.load_state_checked(model, {k: v.to(device) for k, v in state.items()}, source or Path("<weights>"))
    return model.to(device)  # buffers rebuilt from the weights follow them; a no-op for the rest


def build_quantized_model(family: Family, cfg: Any, qc: QuantConfig, weights: Path,
                          device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model quantised with `qc` (nn/quant.py) from its weights file: the quantised modules are
    allocated and the file's tensors copied in one at a time; no fp weight is ever allocated."""
    check_device(qc, device)
    with torch.device("meta"):
        model = quantized_skeleton(family.model_cls(cfg), qc)
    model = model.to_empty(device=device)
    ckpt_io.load_state_streamed(model, weights)
    return model


def load_tokenizer(family: Family, cfg: Any, tokenizer_json: Path) -> Tokenizer | None:
    """The family's tokenizer from a model folder's tokenizer.json (None when there is none)."""
    if not tokenizer_json.is_file():
        return None
    return Tokenizer.load(tokenizer_json, max_length=family.max_tokens(cfg) if family.encoder_tokenizer else None,
                          encoder=family.encoder_tokenizer)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, Tokenizer | None]:
    """(model in eval mode, its config, its Tokenizer or None) from an lmforge run or model directory."""
    directory = ckpt_io.resolve_model_dir(path)
    family, cfg = read_model_config(directory)
    weights, qc = directory / ckpt_io.MODEL_WEIGHTS, read_quantization(directory)
    if qc is None:
        model = build_model(family, cfg, device, ckpt_io.load_tensors(weights), weights).eval()
    else:
        model = build_quantized_model(family, cfg, qc, weights, device).eval()
    for name, attr in family.dir_files.items():
        setattr(model, attr, ckpt_io.read_json(directory / name) if (directory / name).is_file() else None)
    return model, cfg, load_tokenizer(family, cfg, directory / ckpt_io.TOKENIZER)
