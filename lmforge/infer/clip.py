"""Image and text embeddings of CLIP models, and zero-shot image classification by label texts.

    embed_images(model, images)             (N, D) unit-length image embeddings (PIL images or paths)
    embed_texts(model, tokenizer, texts)    (N, D) unit-length text embeddings
    zero_shot(model, tokenizer, images, labels, template="a picture of {}")
        -> [{"label", "score", "probs": {label: p}}] per image: softmax over labels of
           exp(logit_scale) * cos(image, template.format(label)), as CLIP's zero-shot classifier

Images are preprocessed as the model's config says (lmforge/data/images.py, equal to transformers'
CLIPImageProcessor); texts are tokenized by the model's tokenizer (its template adds the EOS the text
tower pools), right-padded, cut to the model's context.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.images import preprocess
from lmforge.errors import LMForgeError
from lmforge.infer.embed import need_tokenizer, texts_arg


def images_arg(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: Any, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
    """(N, D) image embeddings: projected class tokens (a CLIPVisionModel: the pooled class token)."""
    cfg, device = model.cfg, _device(model)
    images = images_arg(images)
    out = []
    for i in range(0, len(images), batch_size):
        px = preprocess(images[i:i + batch_size], cfg.resize_size, cfg.image_size, cfg.image_mean, cfg.image_std)
        e = model.embed_image(px.to(device))
        out.append(F.normalize(e, dim=-1) if normalize else e)
    return torch.cat(out).float().cpu() if out else torch.zeros(0, cfg.embedding_dim)


def text_batch(tokenizer: Any, texts: list[str], block_size: int) -> torch.Tensor:
    return tokenizer.batch(texts, max_length=block_size)["input_ids"]


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer: Any, texts: Any, normalize: bool = True,
                batch_size: int = 32) -> torch.Tensor:
    """(N, D) text embeddings: projected EOS states (a CLIPTextModel: the pooled EOS state)."""
    texts = texts_arg(texts, "embed")
    tok, device = need_tokenizer(tokenizer), _device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        e = model.embed_text(text_batch(tok, texts[i:i + batch_size], model.cfg.block_size).to(device))
        out.append(F.normalize(e, dim=-1) if normalize else e)
    return torch.cat(out).float().cpu() if out else torch.zeros(0, model.cfg.embedding_dim)


def embed_for_llm(llm: Any, texts: Any, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                  batch_size: int = 32) -> torch.Tensor:
    """`LLM.embed` of a CLIP model: its text embeddings (unit length unless normalize=False)."""
    if pooling is not None:
        raise LMForgeError("a CLIP model pools its text at the EOS token; pooling cannot be chosen")
    return embed_texts(llm.model, llm.tokenizer, texts, normalize=normalize is not False, batch_size=batch_size)


@torch.no_grad()
def zero_shot(model: torch.nn.Module, tokenizer: Any, images: Any, labels: Sequence[str],
              template: str = "a picture of {}", batch_size: int = 32) -> list[dict[str, Any]]:
    """Per image: the label whose text `template.format(label)` is most similar, its probability and all."""
    labels = texts_arg(list(labels) if not isinstance(labels, str) else labels, "zero_shot labels")
    if not labels:
        raise LMForgeError("zero_shot needs at least one label")
    if len(set(labels)) != len(labels):
        raise LMForgeError("zero_shot labels hold a label twice")
    if "{}" not in template:
        raise LMForgeError(f"the template must hold '{{}}' where the label goes, got '{template}'")
    txt_LD = embed_texts(model, tokenizer, [template.format(label) for label in labels], batch_size=batch_size)
    img_ND = embed_images(model, images, batch_size=batch_size)
    probs_NL = (model.logit_scale.exp().float().cpu() * img_ND @ txt_LD.t()).softmax(-1)
    out = []
    for row in probs_NL.tolist():
        best = max(range(len(labels)), key=row.__getitem__)
        out.append({"label": labels[best], "score": row[best], "probs": dict(zip(labels, row))})
    return out
