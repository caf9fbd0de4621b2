"""Hugging Face interop of the CLIP family: `CLIPModel`, `CLIPVisionModel` and `CLIPTextModel` in and
out (the interop protocol: lmforge/interop/__init__.py).

    load_hf(dir)                    HF folder -> (CLIP, CLIPConfig, Tokenizer or None)
    convert_from_hf(dir, out)       HF folder -> lmforge model directory
    convert_to_hf(model_dir, out)   lmforge CLIP -> HF folder that transformers loads

The architecture sets `CLIPConfig.parts` (both / vision / text). Separate q/k/v projections are
stacked into lmforge's fused `attn.qkv` ([q; k; v] rows). The image preprocessing of the folder's
preprocessor_config.json (resize, crop, mean, std) goes into the config, and the export writes it
back as a `CLIPImageProcessor` config. CLIP checkpoints are small (ViT-L/14 is 1.7 GB in fp32), so
tensors are converted in memory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.checkpoint import MODEL_WEIGHTS, TOKENIZER, atomic_write_text, load_tensors, read_json, save_tensors
from lmforge.errors import LMForgeError
from lmforge.interop.files import (DEFAULT_MAX_SHARD_SIZE, HF_CONFIG, HF_CONFIG_SIDECAR, SPECIAL_TOKENS_MAP,
                                   TOKENIZER_CONFIG, TempDir, WeightSource, check_out, load_hf_tokenizer,
                                   read_hf_config, read_json_file, state_from_plan, tensors_in_memory,
                                   write_hf_weights, write_model_config)
from lmforge.models.clip import ACTS, CLIPConfig
from lmforge.models.registry import build_model, get_family

CLIP_ARCHITECTURES = {"CLIPModel": "both", "CLIPVisionModel": "vision", "CLIPTextModel": "text"}
ARCHITECTURES = tuple(CLIP_ARCHITECTURES)
_MODEL_TYPE = {"both": "clip", "vision": "clip_vision_model", "text": "clip_text_model"}
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_TOKENIZER_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "vocab.json", "merges.txt")
# transformers' CLIPTextConfig / CLIPVisionConfig defaults: keys a saved config may leave out
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=49407, pad_token_id=1)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_architecture(hf: dict) -> Optional[str]:
    for arch in hf.get("architectures") or []:
        if arch in CLIP_ARCHITECTURES:
            return arch
    return None


def recognises(folder: Path, hf: dict | None) -> bool:
    return hf is not None and clip_architecture(hf) is not None


# ---- config.json <-> CLIPConfig ---------------------------------------------------------------

def _side(value: Any, source: str, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise LMForgeError(f"{source}: {key} {value} is not square; lmforge reads square images only")
        value = value[0]
    return int(value)


def _act(d: dict, source: str) -> str:
    act = d.get("hidden_act", "quick_gelu")
    if act not in ACTS:
        raise LMForgeError(f"{source}: hidden_act '{act}' is not supported ({', '.join(ACTS)})")
    return act


def config_from_hf(hf: dict, preprocessor: dict | None = None, source: str = "config.json") -> CLIPConfig:
    """CLIPConfig of a transformers config.json dict (and its preprocessor_config.json, if any)."""
    arch = clip_architecture(hf)
    if arch is None:
        raise LMForgeError(f"{source}: architecture {hf.get('architectures')} is not a CLIP model lmforge reads; "
                           f"supported: {', '.join(ARCHITECTURES)}")
    parts = CLIP_ARCHITECTURES[arch]
    text = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {} if parts == "both" else hf if parts == "text" else {})}
    vision = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {} if parts == "both" else hf if parts == "vision" else {})}
    acts = {_act(d, source) for d, used in ((text, parts != "vision"), (vision, parts != "text")) if used}
    if len(acts) > 1:
        raise LMForgeError(f"{source}: the towers use different activations ({', '.join(sorted(acts))})")
    eos = text.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    cfg: dict[str, Any] = dict(
        parts=parts, vocab_size=int(text["vocab_size"]), block_size=int(text["max_position_embeddings"]),
        n_layer=int(text["num_hidden_layers"]), n_head=int(text["num_attention_heads"]),
        n_embd=int(text["hidden_size"]), mlp_hidden=int(text["intermediate_size"]),
        image_size=_side(vision["image_size"], source, "image_size"),
        patch_size=_side(vision["patch_size"], source, "patch_size"), num_channels=int(vision["num_channels"]),
        vision_n_layer=int(vision["num_hidden_layers"]), vision_n_head=int(vision["num_attention_heads"]),
        vision_n_embd=int(vision["hidden_size"]), vision_mlp_hidden=int(vision["intermediate_size"]),
        projection_dim=int(hf.get("projection_dim", 512)), hidden_act=acts.pop(),
        norm_eps=float((vision if parts == "vision" else text)["layer_norm_eps"]),
        eos_id=int(eos if eos is not None else 49407), pad_id=int(text.get("pad_token_id") or 0),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)))
    if preprocessor:
        cfg.update(_preprocessing_from_hf(preprocessor, cfg["image_size"], source))
    return CLIPConfig(**cfg)


def _preprocessing_from_hf(pp: dict, image_size: int, source: str) -> dict[str, Any]:
    size, crop = pp.get("size"), pp.get("crop_size")
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_side = (crop.get("height") if isinstance(crop, dict) else crop) or image_size
    if int(crop_side) != image_size:
        raise LMForgeError(f"{source}: the preprocessor crops {crop_side} pixels but the model reads {image_size}")
    out: dict[str, Any] = {"resize_size": int(shortest) if shortest else image_size}
    for key in ("image_mean", "image_std"):
        if pp.get(key) is not None:
            out[key] = [float(x) for x in pp[key]]
    return out


def config_to_hf(cfg: CLIPConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the architecture `cfg.parts` names."""
    text = dict(model_type="clip_text_model", vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                max_position_embeddings=cfg.block_size, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.norm_eps,
                eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, projection_dim=cfg.projection_dim)
    vision = dict(model_type="clip_vision_model", hidden_size=cfg.vision_n_embd, intermediate_size=cfg.vision_mlp_hidden,
                  num_hidden_layers=cfg.vision_n_layer, num_attention_heads=cfg.vision_n_head,
                  num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  hidden_act=cfg.hidden_act, layer_norm_eps=cfg.norm_eps, projection_dim=cfg.projection_dim)
    arch = {v: k for k, v in CLIP_ARCHITECTURES.items()}[cfg.parts]
    body: dict[str, Any] = {"both": dict(model_type="clip", text_config=text, vision_config=vision,
                                         projection_dim=cfg.projection_dim,
                                         logit_scale_init_value=cfg.logit_scale_init),
                            "vision": vision, "text": text}[cfg.parts]
    return {"architectures": [arch], **body, "model_type": _MODEL_TYPE[cfg.parts],
            "dtype": str(dtype).removeprefix("torch.")}


def preprocessor_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """preprocessor_config.json: transformers' CLIPImageProcessor with this model's resize, crop, mean and std."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.resize_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": cfg.image_mean,
            "image_std": cfg.image_std, "do_convert_rgb": True}


# ---- tensor name maps (lmforge name -> HF names; several HF names are stacked along dim 0) -------

def _lin(lm: str, hf: str, bias: bool = True) -> list[tuple[str, list[str]]]:
    return [(f"{lm}.weight", [f"{hf}.weight"])] + ([(f"{lm}.bias", [f"{hf}.bias"])] if bias else [])


def _blocks(lm: str, hf: str, n: int) -> list[tuple[str, list[str]]]:
    m: list[tuple[str, list[str]]] = []
    for i in range(n):
        b, h = f"{lm}.blocks.{i}.", f"{hf}.encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            m.append((f"{b}attn.qkv.{suffix}", [f"{h}self_attn.{p}_proj.{suffix}" for p in "qkv"]))
        m += _lin(b + "attn.proj", h + "self_attn.out_proj") + _lin(b + "norm1", h + "layer_norm1")
        m += _lin(b + "mlp.fc_in", h + "mlp.fc1") + _lin(b + "mlp.fc_out", h + "mlp.fc2")
        m += _lin(b + "norm2", h + "layer_norm2")
    return m


def tensor_map(cfg: CLIPConfig) -> list[tuple[str, list[str]]]:
    """(lmforge name, [HF names]) for every tensor of the model."""
    m: list[tuple[str, list[str]]] = []
    if cfg.has_vision:
        e = "vision_model.embeddings."
        m += [("vision.patch_emb.weight", [e + "patch_embedding.weight"]), ("vision.cls_emb", [e + "class_embedding"]),
              ("vision.pos_emb.weight", [e + "position_embedding.weight"])]
        m += _lin("vision.pre_norm", "vision_model.pre_layrnorm") + _blocks("vision", "vision_model", cfg.vision_n_layer)
        m += _lin("vision.post_norm", "vision_model.post_layernorm")
    if cfg.has_text:
        e = "text_model.embeddings."
        m += [("text.tok_emb.weight", [e + "token_embedding.weight"]),
              ("text.pos_emb.weight", [e + "position_embedding.weight"])]
        m += _blocks("text", "text_model", cfg.n_layer) + _lin("text.norm_f", "text_model.final_layer_norm")
    if cfg.parts == "both":
        m += [("visual_proj.weight", ["visual_projection.weight"]), ("text_proj.weight", ["text_projection.weight"]),
              ("logit_scale", ["logit_scale"])]
    return m


_IGNORABLE = re.compile(r"position_ids$")  # buffers older transformers versions saved
# a single-tower model's tensors are saved without its tower prefix, as save_pretrained writes them
_TOWER_PREFIX = {"vision": "vision_model.", "text": "text_model."}


def state_from_hf(names: list[str], get, cfg: CLIPConfig, where: str) -> dict[str, torch.Tensor]:
    prefix = _TOWER_PREFIX.get(cfg.parts, "")
    if prefix and not any(n.startswith(prefix) for n in names):
        bare = get
        names = [prefix + n for n in names]
        get = lambda name: bare(name[len(prefix):])  # noqa: E731
    return state_from_plan(tensor_map(cfg), set(names), get, where, _IGNORABLE)


def state_to_hf(state: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    out = {}
    for lm, hs in tensor_map(cfg):
        for h, piece in zip(hs, state[lm].chunk(len(hs), 0) if len(hs) > 1 else [state[lm]]):
            out[h] = piece.contiguous()
    prefix = _TOWER_PREFIX.get(cfg.parts, "")
    return {k.removeprefix(prefix): v for k, v in out.items()}


# ---- load / convert ---------------------------------------------------------------------------

def _read(hf_dir: Path) -> tuple[dict, CLIPConfig, dict[str, torch.Tensor]]:
    hf = read_hf_config(hf_dir)
    pp_path = hf_dir / PREPROCESSOR_CONFIG
    pp = read_json_file(pp_path) if pp_path.is_file() else None
    cfg = config_from_hf(hf, pp if isinstance(pp, dict) else None, str(hf_dir / HF_CONFIG))
    src = WeightSource(hf_dir)
    return hf, cfg, state_from_hf(src.names(), src.get, cfg, str(hf_dir))


def load_hf(folder: Path, hf: dict | None, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(CLIP in eval mode, CLIPConfig, Tokenizer or None) from a transformers CLIP folder."""
    hf, cfg, state = _read(folder)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model = build_model(get_family("clip"), cfg, device, state, folder).eval()
    return model, cfg, load_hf_tokenizer(folder, hf, max_length=cfg.block_size)


def convert_from_hf(folder: Path, hf: dict | None, out: Path, overwrite: bool = False) -> Path:
    """transformers CLIP folder -> lmforge model directory."""
    hf, cfg, state = _read(folder)
    check_out(out, overwrite, folder)
    with TempDir(out) as tmp:
        save_tensors(tmp / MODEL_WEIGHTS, state, metadata={"format": "pt", "lmforge": "clip"})
        write_model_config(tmp, "clip", cfg)
        atomic_write_text(tmp / HF_CONFIG_SIDECAR, json.dumps(hf, indent=2))
        for name in (TOKENIZER,) + _TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)
    return out


def convert_to_hf(model_dir: Path, cfg: CLIPConfig, out: Path, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """lmforge CLIP model directory -> transformers folder (config.json, preprocessor_config.json, weights,
    tokenizer files)."""
    check_out(out, overwrite, model_dir)
    state = load_tensors(model_dir / MODEL_WEIGHTS)
    hf_state = state_to_hf(state, cfg)
    hf = config_to_hf(cfg, next(iter(state.values())).dtype)
    origin = model_dir / HF_CONFIG_SIDECAR
    if origin.is_file():  # keep what the source said (token ids, names) where it does not conflict
        old = read_json(origin)
        if isinstance(old, dict) and old.get("model_type") == hf["model_type"]:
            hf = {**old, **hf}
    with TempDir(out) as tmp:
        write_hf_weights(tmp, tensors_in_memory(hf_state), max_shard_size)
        atomic_write_text(tmp / HF_CONFIG, json.dumps(hf, indent=2))
        if cfg.has_vision:
            atomic_write_text(tmp / PREPROCESSOR_CONFIG, json.dumps(preprocessor_to_hf(cfg), indent=2))
        for name in (TOKENIZER,) + _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
    return out
