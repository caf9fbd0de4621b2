"""Report section 2, memorisation and privacy: extraction, membership inference, canary exposure.

All three read the prepared data directory the model was trained on (its train and val splits) and
apply to decoders (models that continue a prompt); other families say so.

Extraction (Carlini et al. 2021, 2023): `extraction_samples` windows of k + m tokens (defaults 32 + 32)
at uniformly random positions inside documents (no EOS in the window) of each split; the model
continues the k-token prefix greedily for m tokens. extraction_rate_{train,heldout} = share of windows
whose m tokens come back exactly; token_match_* = mean share of matching tokens.

Membership inference: `membership_samples` windows of `membership_window` tokens from each split,
scored per window by three attacks, higher = "was trained on":
  loss       -mean NLL (nats per token)
  zlib       -mean NLL / zlib-compressed bytes of the window's text (Carlini et al. 2021)
  reference  -(mean NLL - a reference model's mean NLL), when options["reference_model"] names one
ROC AUC of each over train (positive) vs held-out windows (ties count half, as the Mann-Whitney U);
membership_auc is the loss attack's.

Canary exposure (Carlini et al. 2019): for each canary `prepare --canaries` recorded, the log-perplexity
(-log2 p, summed over its tokens) of the inserted text against the candidate space R of all secrets
of its length. exposure = log2 |R| - log2 rank(secret). When |R| <= `canary_candidates` every candidate
is scored (exact rank); otherwise that many random candidates are, and the rank is extrapolated from a
normal fit of their log-perplexities (the paper fits a skew-normal): exposure = -log2 P[X <= x_secret],
capped at log2 |R|.

Differential privacy: a model `lmforge federated --dp-clipping-norm` trained carries its guarantee in
federated_state.json (client-level epsilon at delta from Flower's RDP accountant, the clipping norm,
noise multiplier and rounds); the section reports it as `differential_privacy`, beside the attacks
that test it empirically.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.dataset import TokenData
from lmforge.errors import LMForgeError
from lmforge.eval.report.context import ReportContext
from lmforge.eval.report.likelihood import at_least_fp32, causal_token_logprobs
from lmforge.eval.report.plots import figure_img, new_figure, table
from lmforge.infer.generate import generate_ids
from lmforge.models.registry import CONTINUE

FEDERATED_STATE = "federated_state.json"  # written into the global model's directory by lmforge federated
DEFAULTS = {"prefix_tokens": 32, "suffix_tokens": 32, "extraction_samples": 128, "membership_window": 64,
            "membership_samples": 256, "canary_candidates": 1024, "batch_size": 32}


def option(options: dict[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


# ---- windows ----------------------------------------------------------------------------------

def window_starts(tokens: np.ndarray, eos_id: int, length: int, n: int, generator: torch.Generator) -> np.ndarray:
    """`n` random start positions of `length`-token windows holding no EOS (fewer when fewer exist)."""
    if len(tokens) < length:
        return np.zeros(0, dtype=np.int64)
    eos_before = np.concatenate([[0], np.cumsum(np.asarray(tokens) == eos_id)])  # EOS count in tokens[:i]
    starts = np.arange(len(tokens) - length + 1)
    valid = starts[eos_before[starts + length] == eos_before[starts]]
    if len(valid) <= n:
        return valid
    pick = torch.randperm(len(valid), generator=generator)[:n].numpy()
    return np.sort(valid[pick])


def windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]) if len(starts) else \
        np.zeros((0, length), dtype=np.int64)


# ---- extraction --------------------------------------------------------------------------------

def extraction(model: torch.nn.Module, rows: np.ndarray, k: int, m: int, batch_size: int) -> dict[str, Any]:
    """Greedy continuation of each row's first k tokens for m tokens, against its next m tokens."""
    exact, match = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        got = generate_ids(model, chunk[:, :k].tolist(), max_new_tokens=m, temperature=0.0)
        for row, new in zip(chunk, got):
            truth = row[k:k + m].tolist()
            same = sum(a == b for a, b in zip(new, truth))
            exact.append(new == truth)
            match.append(same / m)
    return {"rate": float(np.mean(exact)), "token_match": float(np.mean(match)), "n": len(rows)}


# ---- membership inference ------------------------------------------------------------------------

@torch.no_grad()
def window_nll(model: torch.nn.Module, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean next-token NLL (nats) of each row, every token predicted from the row's own prefix."""
    device = model.tok_emb.weight.device
    out = []
    for i in range(0, len(rows), batch_size):
        x_BT = torch.from_numpy(rows[i:i + batch_size]).to(device)
        logits_BTV = at_least_fp32(model(x_BT[:, :-1]))
        nll_BT = F.cross_entropy(logits_BTV.transpose(1, 2), x_BT[:, 1:], reduction="none")
        out.append(nll_BT.double().mean(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def zlib_bytes(tokenizer: Any, rows: np.ndarray) -> np.ndarray:
    """zlib-compressed size of each row's text (of its token ids' bytes without a tokenizer)."""
    def raw(row: np.ndarray) -> bytes:
        return tokenizer.decode(row.tolist()).encode("utf-8") if tokenizer is not None else row.tobytes()

    return np.array([len(zlib.compress(raw(r))) for r in rows], dtype=np.float64)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `labels` (1 = positive): the Mann-Whitney U statistic
    over average ranks (ties count half)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based average rank of each tie group
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fps / max(1, (~y).sum())], np.r_[0.0, tps / max(1, y.sum())]


def membership(llm: Any, train_rows: np.ndarray, val_rows: np.ndarray, reference: Any,
               batch_size: int) -> dict[str, Any]:
    rows = np.concatenate([train_rows, val_rows])
    labels = np.r_[np.ones(len(train_rows)), np.zeros(len(val_rows))]
    nll = window_nll(llm.model, rows, batch_size)
    attacks = {"loss": -nll, "zlib": -nll / zlib_bytes(llm.tokenizer, rows)}
    if reference is not None:
        attacks["reference"] = -(nll - window_nll(reference.model, rows, batch_size))
    out: dict[str, Any] = {}
    for name, score in attacks.items():
        fpr, tpr = roc_curve(score, labels)
        out[name] = {"auc": roc_auc(score, labels), "fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    return {"attacks": out, "n_train": len(train_rows), "n_heldout": len(val_rows),
            "mean_nll_train": float(nll[:len(train_rows)].mean()), "mean_nll_heldout": float(nll[len(train_rows):].mean())}


# ---- canaries ------------------------------------------------------------------------------------

def log_perplexity_bits(llm: Any, texts: list[str], batch_size: int) -> np.ndarray:
    return np.array([-x.sum() / math.log(2) for x in causal_token_logprobs(llm.model, llm.tokenizer, texts, batch_size)])


def exposure(llm: Any, plan: dict[str, Any], secret: str, n_candidates: int, generator: torch.Generator,
             batch_size: int) -> dict[str, Any]:
    alphabet, length = plan["alphabet"], int(plan["length"])
    space = len(alphabet) ** length
    log2_space = length * math.log2(len(alphabet))
    x_true = float(log_perplexity_bits(llm, [plan["template"].format(secret=secret)], batch_size)[0])
    if space <= n_candidates:
        cands = ["".join(c) for c in itertools.product(alphabet, repeat=length)]
        exact = True
    else:
        picks = torch.randint(len(alphabet), (n_candidates, length), generator=generator).tolist()
        cands = ["".join(alphabet[i] for i in p) for p in picks]
        exact = False
    x = log_perplexity_bits(llm, [plan["template"].format(secret=c) for c in cands if c != secret], batch_size)
    if exact:
        rank = 1 + int((x < x_true).sum())
        value = log2_space - math.log2(rank)
    else:
        z = (x_true - x.mean()) / max(x.std(), 1e-12)
        cdf = 0.5 * math.erfc(-z / math.sqrt(2))
        value = min(log2_space, -math.log2(cdf) if cdf > 0 else log2_space)
        rank = 1 + int(round(space * float((x < x_true).mean())))
    return {"secret": secret, "exposure": value, "rank": rank, "exact": exact,
            "log_perplexity_bits": x_true, "candidates": len(x) + 1, "max_exposure": log2_space}


def canaries(llm: Any, plan: dict[str, Any] | None, n_candidates: int, generator: torch.Generator,
             batch_size: int) -> dict[str, Any]:
    if not plan:
        return {"applies": False, "reason": "the training data holds no canaries (lmforge prepare --canaries N)"}
    rows = []
    for s in plan["secrets"]:
        r = exposure(llm, plan, s["secret"], n_candidates, generator, 8 * batch_size)  # short texts: bigger batches
        rows.append({**r, "repeats": s["repeats"]})
    by_repeats: dict[int, list[float]] = {}
    for r in rows:
        by_repeats.setdefault(r["repeats"], []).append(r["exposure"])
    return {"applies": True, "template": plan["template"], "canaries": rows,
            "mean_exposure_by_repeats": {str(k): float(np.mean(v)) for k, v in sorted(by_repeats.items())}}


# ---- the section ----------------------------------------------------------------------------------

def _reference(options: dict[str, Any], llm: Any) -> Any:
    ref = options.get("reference_model")
    if ref is None:
        return None
    from lmforge.infer.llm import LLM

    ref = LLM.of(ref, device=llm.device)
    if int(ref.config.vocab_size) != int(llm.config.vocab_size):
        raise LMForgeError(f"the reference model {ref.path} has a vocabulary of {ref.config.vocab_size} tokens, the "
                           f"model {llm.config.vocab_size}; the reference attack needs the same tokenizer")
    return ref


def differential_privacy(model_path: Path | None) -> dict[str, Any] | None:
    """The DP record of a federated run's global model (MODEL or MODEL/model), or None."""
    if model_path is None:
        return None
    for d in (Path(model_path), Path(model_path) / "model"):
        if (d / FEDERATED_STATE).is_file():
            dp = json.loads((d / FEDERATED_STATE).read_text(encoding="utf-8")).get("dp")
            if dp:
                return {k: v for k, v in dp.items() if k != "accountant"} | {"method": "federated DP-FedAvg, "
                        "Flower fixed clipping + Gaussian noise, RDP accountant (client level, no sampling amplification)"}
            return None
    return None


def run(ctx: ReportContext) -> dict[str, Any]:
    """Options: the DEFAULTS keys above, and reference_model (a path or an LLM) for the reference attack."""
    result = _attacks(ctx)
    dp = differential_privacy(ctx.llm.path)
    return result if dp is None else {**result, "differential_privacy": dp}


def _attacks(ctx: ReportContext) -> dict[str, Any]:
    llm, opts = ctx.llm, ctx.options
    if CONTINUE not in llm.tasks:
        return {"applies": False, "reason": f"extraction and membership inference need a decoder that continues "
                                            f"text, not a model of the {llm.family.name} family"}
    if ctx.data is None:
        return {"applies": False, "reason": "no prepared data directory (--data) to draw training and held-out "
                                            "windows from"}
    data = TokenData(ctx.data)
    if data.vocab_size > int(llm.config.vocab_size):
        raise LMForgeError(f"data {ctx.data} has a vocabulary of {data.vocab_size} tokens but the model's is "
                           f"{llm.config.vocab_size}; give the data the model was trained on")
    train, val = data.split("train"), data.split("val")
    if len(val) == 0:
        return {"applies": False, "reason": f"{ctx.data} has no held-out split (prepared with --val-fraction 0)"}
    k, m = option(opts, "prefix_tokens"), option(opts, "suffix_tokens")
    batch = option(opts, "batch_size")
    ctx_len = int(llm.config.block_size)
    if k + m > ctx_len:
        raise LMForgeError(f"prefix_tokens + suffix_tokens = {k + m} exceeds the model's context ({ctx_len})")
    g = ctx.generator
    L = min(option(opts, "membership_window"), ctx_len + 1)
    drawn = {}
    for name, tokens in (("train", train), ("val", val)):
        for use, length, n in (("extraction", k + m, option(opts, "extraction_samples")),
                               ("membership", L, option(opts, "membership_samples"))):
            rows = windows(tokens, window_starts(tokens, data.eos_id, length, n, g), length)
            if len(rows) == 0:
                return {"applies": False, "reason": f"no {length}-token window fits inside one document of the "
                                                    f"{name} split of {ctx.data}"}
            drawn[name, use] = rows
    ex_train = extraction(llm.model, drawn["train", "extraction"], k, m, batch)
    ex_val = extraction(llm.model, drawn["val", "extraction"], k, m, batch)
    mi = membership(llm, drawn["train", "membership"], drawn["val", "membership"], _reference(opts, llm), batch)
    return {
        "applies": True,
        "extraction_rate_train": ex_train["rate"],
        "extraction_rate_heldout": ex_val["rate"],
        "membership_auc": mi["attacks"]["loss"]["auc"],
        "extraction": {"prefix_tokens": k, "suffix_tokens": m, "decoding": "greedy",
                       "train": ex_train, "heldout": ex_val},
        "membership": {"window_tokens": L, **mi},
        "canaries": canaries(llm, data.meta.get("canaries"), option(opts, "canary_candidates"), g, batch),
        "data": str(ctx.data),
    }


def html(result: dict[str, Any]) -> str:
    dp = result.get("differential_privacy")
    dp_html = "" if dp is None else (
        f"<h3>Differential privacy</h3><p>Trained federated with client-level DP: updates clipped to L2 norm "
        f"{dp['clipping_norm']:g}, Gaussian noise multiplier {dp['noise_multiplier']:g}, {dp['releases']} rounds of "
        f"{dp['clients_per_round']} of {dp['population']} clients: "
        + (f"epsilon {dp['epsilon']:.2f} at delta {dp['dp_delta']:g}" if "epsilon" in dp else "no noise, no epsilon")
        + ".</p>")
    if not result.get("applies", False):
        return dp_html + f"<p>Memorisation: does not apply ({escape(result.get('reason', ''))}).</p>"
    ex = result["extraction"]
    parts = [f"<h3>Extraction</h3><p>Greedy continuation of {ex['prefix_tokens']}-token prefixes for "
             f"{ex['suffix_tokens']} tokens: reproduced exactly for {100 * result['extraction_rate_train']:.1f}% of "
             f"{ex['train']['n']} training windows and {100 * result['extraction_rate_heldout']:.1f}% of "
             f"{ex['heldout']['n']} held-out ones.</p>"
             + table([["train", ex["train"]["rate"], ex["train"]["token_match"], ex["train"]["n"]],
                      ["held-out", ex["heldout"]["rate"], ex["heldout"]["token_match"], ex["heldout"]["n"]]],
                     ["split", "exact", "token match", "windows"])]
    mi = result["membership"]
    fig, ax = new_figure(4.5, 4.0)
    for name, a in mi["attacks"].items():
        ax.plot(a["fpr"], a["tpr"], label=f"{name} (AUC {a['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlabel("false positive rate (held-out called member)")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    parts.append(f"<h3>Membership inference</h3><p>{mi['n_train']} training vs {mi['n_heldout']} held-out windows of "
                 f"{mi['window_tokens']} tokens; AUC 0.5 = no leakage. Mean loss {mi['mean_nll_train']:.3f} (train) vs "
                 f"{mi['mean_nll_heldout']:.3f} (held-out) nats per token.</p>" + figure_img(fig, "membership ROC"))
    can = result["canaries"]
    if can.get("applies", True):
        rows = [[c["secret"], c["repeats"], c["exposure"], c["rank"], "exact" if c["exact"] else "estimated"]
                for c in can["canaries"]]
        parts.append(f"<h3>Canaries</h3><p>Exposure of secrets inserted as '{escape(can['template'])}' "
                     f"(max {can['canaries'][0]['max_exposure']:.1f} bits = always ranked first).</p>"
                     + table(rows, ["secret", "repeats", "exposure (bits)", "rank", "rank is"]))
    else:
        parts.append(f"<h3>Canaries</h3><p>{escape(can['reason'])}.</p>")
    return dp_html + "\n".join(parts)
