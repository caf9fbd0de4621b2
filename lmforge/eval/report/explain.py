"""Explanations: why a model gives its output for one text (report section 4 and `lmforge explain`).

    explain(llm, text, target=None, steps=64) -> dict       tokens, target, attributions, attention
    explain_to_dir(llm, text, out, ...)                     + explain.json, attention.png, attributions.png

Attention maps: the probabilities of every head of every attention layer, softmax(q.k * scale +
mask), recomputed from the inputs each attention module receives in the one forward pass (a forward
pre-hook calls the module's `scores`; the fused SDPA kernel never materialises them). Stacks are
named by module path with the layer index taken out: `blocks.attn` (decoders and encoders),
`encoder.attn`, `decoder.self_attn`, `decoder.cross_attn` (encoder-decoders).

Attention rollout (Abnar & Zuidema 2020) of every self-attention stack: per layer the head mean A,
then A' = (A + I) / 2 (the residual connection), rows renormalised, multiplied from the first layer
up: R = A'_L ... A'_1; R[i, j] is how much of input token j flows into position i (rows sum to 1).

Integrated gradients (Sundararajan et al. 2017) on the input token embeddings (the output of
`tok_emb`; positions and token types added after it are left as they are), from a baseline where
every token is the pad token (an encoder keeps its [CLS] / [SEP] framing). The path integral is
taken with Gauss-Legendre quadrature of `steps` points, as Captum's `LayerIntegratedGradients`
(method "gausslegendre") does, and a token's attribution is the sum over its embedding dimensions.
What is explained:
    classifier (encoder with a sequence head, decoder classifier): the label's logit
    decoder: log p(next token) after the text
    encoder-decoder: log p(first target token | source)
    masked-LM encoder: log p(token at the first [MASK])
Completeness: the attributions sum to output(text) - output(baseline); the check reports the gap
relative to that difference (within 1% is the bar; more steps close it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.eval.report.plots import esc, figure_img, table
from lmforge.eval.report.context import ReportContext
from lmforge.models.seq2seq import MultiHeadAttention
from lmforge.nn.layers import Attention

DEFAULT_STEPS = 64
MAX_TOKENS = 48  # longer texts are cut (the maps are T x T per head)
DEFAULT_TEXTS = {"classify": ["a wonderful, moving film", "the plot was dull and far too long"],
                 "generate": ["The king said that", "Once upon a time there"]}


# ---- attention ----------------------------------------------------------------------------------

def _probs(scores_BHTS: torch.Tensor, mask: Any, causal: bool) -> torch.Tensor:
    """softmax of scores under an SDPA mask (bool: True = may attend; float: added) or causal flag."""
    s = scores_BHTS.float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    elif causal and s.shape[-2] > 1:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T), float("-inf"))
    return s.softmax(-1)


def _stack_name(module_name: str) -> str:
    return re.sub(r"\.\d+\.", ".", module_name)


class AttentionRecorder:
    """Records the attention probabilities of every attention module during a forward pass:
    `with AttentionRecorder(model) as rec: model(...)`, then `rec.stacks()` -> {stack: (L, B, H, T, S)}."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "AttentionRecorder":
        for name, module in self.model.named_modules():
            if isinstance(module, (Attention, MultiHeadAttention)):
                self.handles.append(module.register_forward_pre_hook(self._hook(_stack_name(name)), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, stack: str) -> Callable:
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            with torch.no_grad():
                x_BTC = args[0]
                if isinstance(module, Attention):  # (x, ctx, rope=...): decoders and encoders
                    ctx = args[1]
                    scores = module.scores(x_BTC, kwargs.get("rope"))
                    probs = _probs(scores, ctx.mask, ctx.is_causal)
                else:  # seq2seq: (x, mask=..., is_causal=..., kv=...)
                    scores = module.scores(x_BTC, kwargs.get("kv"))
                    probs = _probs(scores, kwargs.get("mask"), kwargs.get("is_causal", False))
            self.maps.setdefault(stack, []).append(probs.detach().cpu())
        return record

    def stacks(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(maps) for name, maps in self.maps.items()}


def rollout(maps_LHTT: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema) of one self-attention stack: (T, T), rows summing to 1."""
    T = maps_LHTT.shape[-1]
    eye = torch.eye(T, dtype=torch.float64)
    r = eye
    for a_HTT in maps_LHTT.double():
        a = 0.5 * a_HTT.mean(0) + 0.5 * eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r.float()


# ---- what is explained --------------------------------------------------------------------------

class Explained:
    """One input of one model, ready for a forward pass: token ids, how to run the model with the
    input embeddings replaced, and which output is explained."""

    def __init__(self, llm: Any, text: str, target: str | None):
        self.llm, self.model, self.tok = llm, llm.model, llm.tokenizer
        if self.tok is None:
            raise LMForgeError(f"the model at {llm.path} has no tokenizer (tokenizer.json), so it cannot read text")
        family = llm.family
        self.family = family.name
        cfg = llm.config
        self.type_ids: torch.Tensor | None = None
        self.kind = self._kind(cfg)
        if self.kind == "label" and family.encoder_tokenizer:
            ids, types, _ = self.tok.encode_pairs([text], None, MAX_TOKENS)
            self.ids, self.type_ids = ids[0], torch.tensor([types[0]])
        elif self.kind == "label":
            from lmforge.data.labeled import decoder_rows

            rows, _, _ = decoder_rows(self.tok, [text], None, MAX_TOKENS)
            self.ids = rows[0].tolist()
        elif self.kind == "masked_token":
            ids, types, _ = self.tok.encode_pairs([text], None, MAX_TOKENS)
            self.ids, self.type_ids = ids[0], torch.tensor([types[0]])
        else:
            self.ids = llm.prompt_batch(text)[1][0][-MAX_TOKENS:]
        if not self.ids:
            raise LMForgeError("the text to explain is empty")
        self.tokens = [self.tok.decode([i]) or self.tok.id_to_token(i) or str(i) for i in self.ids]
        self.keep = {self.tok.cls_id, self.tok.sep_id} - {None} if family.encoder_tokenizer else set()
        pad = self.tok.pad_id if self.tok.pad_id is not None else (self.tok.eos_id or 0)
        self.baseline_ids = [i if i in self.keep else pad for i in self.ids]
        self.baseline_token = self.tok.id_to_token(pad)
        if self.kind == "masked_token":
            if self.tok.mask_id not in self.ids:
                mask = self.tok.id_to_token(self.tok.mask_id)
                raise LMForgeError(f"a masked-LM encoder explains the token at a mask: put {mask} in the text")
            self.position = self.ids.index(self.tok.mask_id)
        self.target_id, self.target_name = self._target(target)

    def _kind(self, cfg: Any) -> str:
        tasks = self.llm.tasks
        if "classify" in tasks:
            return "label"
        if "generate" in tasks and "continue" not in tasks:  # an encoder-decoder: its output is a new target
            return "first_target_token"
        if "generate" in tasks:
            return "next_token"
        if "masked_lm" in tasks and getattr(cfg, "head", None) == "mlm":  # the registry counts every
            return "masked_token"                                         # non-classifier encoder as MLM
        raise LMForgeError(f"a {self.family} model with model.head '{getattr(cfg, 'head', None)}' has no output to "
                           "explain (token attributions need a classifier or a language-model head)")

    def _target(self, target: str | None) -> tuple[int, str]:
        ids = torch.tensor([self.ids])
        if self.kind == "label":
            from lmforge.infer.classify import label_names

            names = label_names(self.model)
            if target is None:
                k = int(self.outputs(None, ids)[0].argmax())
                return k, names[k]
            if target in names:
                return names.index(target), target
            if target.isdigit() and int(target) < len(names):
                return int(target), names[int(target)]
            raise LMForgeError(f"--target '{target}' is not a label of this classifier; its labels: {', '.join(names)}")
        if target is None:
            k = int(self.outputs(None, ids)[0].argmax())
            return k, self.tok.decode([k])
        pieces = self.tok.encode(target)
        if len(pieces) != 1:
            raise LMForgeError(f"--target '{target}' is {len(pieces)} tokens of this tokenizer; give one token")
        return pieces[0], target

    def outputs(self, embeds_BTC: torch.Tensor | None, ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, classes or vocab) scores of the explained position: logits for a label, log-probabilities
        for a token. `embeds_BTC` replaces the input token embeddings (the first `tok_emb` call)."""
        model = self.model
        handle = None
        if embeds_BTC is not None:
            calls = []

            def replace(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                calls.append(1)
                return embeds_BTC if len(calls) == 1 else None  # seq2seq: the decoder's lookup stays
            handle = model.tok_emb.register_forward_hook(replace)
        try:
            device = model.tok_emb.weight.device
            ids_BT = ids_BT.to(device)
            if self.kind == "label" and self.type_ids is not None:
                return model(ids_BT, token_type_BT=self.type_ids.to(device).expand_as(ids_BT))
            if self.kind == "label":
                return model(ids_BT)
            if self.kind == "masked_token":
                h = model.encode(ids_BT, token_type_BT=self.type_ids.to(device).expand_as(ids_BT))
                return F.log_softmax(model.mlm_logits(h[:, self.position]).float(), -1)
            if self.kind == "first_target_token":
                start = torch.full((ids_BT.shape[0], 1), model.cfg.decoder_start_id, device=device)
                return F.log_softmax(model(ids_BT, start)[:, -1].float(), -1)
            return F.log_softmax(model(ids_BT)[:, -1].float(), -1)
        finally:
            if handle is not None:
                handle.remove()


def gauss_legendre(steps: int) -> tuple[list[float], list[float]]:
    """(alphas in [0, 1], weights) of Gauss-Legendre quadrature on [0, 1] (Captum's 'gausslegendre')."""
    x, w = np.polynomial.legendre.leggauss(steps)
    return list(0.5 * (x + 1)), list(0.5 * w)


def integrated_gradients(ex: Explained, steps: int = DEFAULT_STEPS) -> tuple[torch.Tensor, dict[str, Any]]:
    """(attributions per input token (T,), completeness) of `ex`'s explained output."""
    model, target = ex.model, ex.target_id
    ids = torch.tensor([ex.ids])
    base_ids = torch.tensor([ex.baseline_ids])
    with torch.no_grad():
        x_TC = model.tok_emb(ids.to(model.tok_emb.weight.device))[0].float()
        x0_TC = model.tok_emb(base_ids.to(model.tok_emb.weight.device))[0].float()
        out_x = float(ex.outputs(None, ids)[0, target])
        out_0 = float(ex.outputs(None, base_ids)[0, target])
    alphas, weights = gauss_legendre(steps)
    a_N11 = torch.tensor(alphas, dtype=x_TC.dtype, device=x_TC.device)[:, None, None]
    path_NTC = (x0_TC + a_N11 * (x_TC - x0_TC)).requires_grad_(True)
    out_N = ex.outputs(path_NTC, ids.expand(steps, -1))[:, target]
    (grads_NTC,) = torch.autograd.grad(out_N.sum(), path_NTC)
    w_N11 = torch.tensor(weights, dtype=grads_NTC.dtype, device=grads_NTC.device)[:, None, None]
    attr_TC = (grads_NTC * w_N11).sum(0) * (x_TC - x0_TC)
    attr_T = attr_TC.sum(-1).detach().cpu()
    total, diff = float(attr_T.sum()), out_x - out_0
    gap = abs(total - diff) / max(abs(diff), 1e-12)
    return attr_T, {"sum_attributions": total, "output": out_x, "baseline_output": out_0, "output_difference": diff,
                    "relative_error": gap, "within_1pct": gap <= 0.01, "steps": steps}


def explain(llm: Any, text: str, target: str | None = None, steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """Attention maps, rollout and integrated-gradients attributions of `text` (JSON-ready)."""
    model = llm.model
    was_training = model.training
    model.eval()
    try:
        ex = Explained(llm, text, target)
        with AttentionRecorder(model) as rec, torch.no_grad():
            ex.outputs(None, torch.tensor([ex.ids]))
        stacks = {name: maps[:, 0] for name, maps in rec.stacks().items()}  # (L, H, T, S) of the one row
        attr_T, completeness = integrated_gradients(ex, steps)
    finally:
        model.train(was_training)
    what = {"label": "the label's logit", "next_token": "log p(next token)",
            "first_target_token": "log p(first target token | source)",
            "masked_token": "log p(token at the mask)"}[ex.kind]
    return {
        "text": text, "family": ex.family, "tokens": ex.tokens,
        "target": {"kind": ex.kind, "id": ex.target_id, "name": ex.target_name, "output": what},
        "attributions": [round(float(a), 6) for a in attr_T],
        "completeness": completeness,
        "method": {"attributions": f"integrated gradients on the input token embeddings, Gauss-Legendre with "
                                   f"{steps} points (Captum LayerIntegratedGradients, method gausslegendre)",
                   "baseline": f"every token {ex.baseline_token!r}" + (" except [CLS]/[SEP]" if ex.keep else ""),
                   "attention": "softmax(q.k * scale + mask) per head, recomputed from each attention module's "
                                "inputs in the forward pass",
                   "rollout": "Abnar & Zuidema 2020: head mean, (A + I) / 2 renormalised, product over layers"},
        "attention": {name: np.round(maps.numpy(), 4).tolist() for name, maps in stacks.items()},
        "rollout": {name: np.round(rollout(maps).numpy(), 5).tolist()
                    for name, maps in stacks.items() if maps.shape[-1] == maps.shape[-2]},
    }


# ---- pictures -----------------------------------------------------------------------------------

def _labels(result: dict[str, Any], stack: str) -> tuple[list[str], list[str]]:
    """(query labels, key labels) of a stack's maps: the decoder side of a seq2seq model reads only
    the decoder start, its keys the source."""
    tokens = result["tokens"]
    maps = result["attention"][stack]
    T, S = len(maps[0][0]), len(maps[0][0][0])
    q = tokens if T == len(tokens) else [f"t{i}" for i in range(T)]
    k = tokens if S == len(tokens) else [f"t{i}" for i in range(S)]
    return q, k


def attention_figure(result: dict[str, Any], stack: str) -> Any:
    """A grid of heatmaps: one row per layer, one column per head, plus the rollout column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = np.asarray(result["attention"][stack])
    L, H = maps.shape[:2]
    roll = result["rollout"].get(stack)
    cols = H + (roll is not None)
    q, k = _labels(result, stack)
    cell = 1.6 if len(k) <= 16 else 2.2
    fig, axes = plt.subplots(L, cols, figsize=(cell * cols, cell * L), squeeze=False)
    for layer in range(L):
        for h in range(H):
            ax = axes[layer][h]
            ax.imshow(maps[layer, h], cmap="viridis", vmin=0, aspect="auto")  # each map on its own scale
            ax.set_xticks([]), ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
        if roll is not None:
            ax = axes[layer][H]
            ax.axis("off")
    if roll is not None:  # the rollout, in the last column's first cell, with token labels
        ax = axes[0][H]
        ax.axis("on")
        ax.imshow(np.asarray(roll), cmap="magma", vmin=0, aspect="auto")
        ax.set_title("rollout", fontsize=8)
        ax.set_xticks(range(len(k)), k, rotation=90, fontsize=5)
        ax.set_yticks(range(len(q)), q, fontsize=5)
    fig.suptitle(f"attention: {stack} ({L} layers x {H} heads)", fontsize=10)
    return fig


def attribution_figure(result: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attr = np.asarray(result["attributions"])
    tokens = result["tokens"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(tokens) + 1), 2.6))
    ax.bar(range(len(attr)), attr, color=["#c0392b" if a < 0 else "#2471a3" for a in attr])
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.axhline(0, color="#444", linewidth=0.6)
    t = result["target"]
    ax.set_title(f"integrated gradients for {t['output']} ({t['name']!r})", fontsize=9)
    return fig


def explain_to_dir(llm: Any, text: str, out: str | Path, target: str | None = None,
                   steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """`lmforge explain`: explain.json, attention.png (every self-attention stack's grid, the first
    stack for several) and attributions.png in `out`."""
    result = explain(llm, text, target, steps)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(result) + "\n", encoding="utf-8")
    for i, stack in enumerate(result["attention"]):
        name = "attention.png" if i == 0 else f"attention_{stack.replace('.', '_')}.png"
        attention_figure(result, stack).savefig(out / name, dpi=110, bbox_inches="tight")
    attribution_figure(result).savefig(out / "attributions.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close("all")
    return result


# ---- the report section -------------------------------------------------------------------------

def run(ctx: ReportContext) -> dict[str, Any]:
    """A few examples (options: explain_texts, a list or '|'-separated string; explain_steps)."""
    llm = ctx.llm
    texts = ctx.option("explain_texts", None)
    if isinstance(texts, str):
        texts = [t for t in texts.split("|") if t.strip()]
    if not texts:
        texts = DEFAULT_TEXTS["classify" if "classify" in llm.tasks else "generate"]
        if "masked_lm" in llm.tasks and llm.tokenizer is not None and llm.tokenizer.mask_id is not None:
            mask = llm.tokenizer.id_to_token(llm.tokenizer.mask_id)
            texts = [f"The king said that {mask} would come", f"Once upon a {mask} there was"]
    if llm.tokenizer is None:
        return {"applies": False, "reason": "the model has no tokenizer, so it cannot read example texts"}
    steps = int(ctx.option("explain_steps", DEFAULT_STEPS))
    try:
        examples = [explain(llm, t, None, steps) for t in texts]
    except LMForgeError as e:
        return {"applies": False, "reason": str(e)}
    return {"applies": True, "examples": examples,
            "all_complete_within_1pct": all(e["completeness"]["within_1pct"] for e in examples)}


def html(result: dict[str, Any]) -> str:
    parts = [f'<p class="note">{esc(result["examples"][0]["method"]["attributions"])}; baseline: '
             f'{esc(result["examples"][0]["method"]["baseline"])}. Attention rollout: Abnar &amp; Zuidema 2020.</p>']
    for ex in result["examples"]:
        c = ex["completeness"]
        parts.append(f"<h3>{esc(ex['text'])}</h3>")
        parts.append(table([("explained", f"{ex['target']['output']} = {ex['target']['name']!r}"),
                            ("sum of attributions", f"{c['sum_attributions']:.5f}"),
                            ("output - baseline output", f"{c['output_difference']:.5f}"),
                            ("completeness gap", f"{100 * c['relative_error']:.3f}% "
                                                 f"({'within' if c['within_1pct'] else 'NOT within'} 1%)")]))
        top = sorted(zip(ex["tokens"], ex["attributions"]), key=lambda p: -abs(p[1]))[:5]
        parts.append(table([(t, f"{a:+.4f}") for t, a in top], header=("token", "attribution (largest 5)")))
        parts.append(figure_img(attribution_figure(ex), f"attributions: {ex['text']}"))
        for stack in ex["attention"]:
            if stack in ex["rollout"] or len(ex["attention"]) == 1:
                parts.append(figure_img(attention_figure(ex, stack), f"attention {stack}: {ex['text']}"))
    return "\n".join(parts)
