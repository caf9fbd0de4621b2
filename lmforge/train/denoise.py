"""Denoising pretraining for encoder-decoders: `lmforge train --objective span_corruption | text_infilling`.

T5 span corruption (Raffel et al. 2020, sec. 3.1.4): in every window `objective.noise_density`
(0.15) of the tokens, in spans of mean length `objective.mean_span_length` (3), are dropped from
the source; each dropped span leaves one sentinel token, and the target lists the sentinels each
followed by the tokens they replaced:

    window  the king is dead long live the king        (noise: "is dead", "the")
    source  the king <s0> long live <s1> king </s>
    target  <s0> is dead <s1> the </s>

Span lengths come from T5's `random_spans_noise_mask`: the number of noise tokens and spans is
fixed by the window length; a random composition splits them into spans, noise and non-noise
alternating from a non-noise start. Sentinel i is the id `model.vocab_size - 1 - i` (T5's
`<extra_id_i>` layout); with an lmforge tokenizer give the model room for them
(`--model.vocab_size` = the tokenizer's size + `objective.num_sentinels`), or use a tokenizer
that has `<extra_id_i>` tokens.

BART text infilling + sentence permutation (Lewis et al. 2020, sec. 2.2): the window's sentences
are shuffled (`objective.permute_sentences`), then spans with Poisson(`objective.poisson_lambda`)
lengths are replaced, each by ONE mask token, until `objective.infill_ratio` (0.3) of the tokens
are masked (a 0-length span inserts a mask); the target is the original window.

Every micro-batch draws from a generator seeded by (seed, step, index), so resuming reproduces
the uninterrupted run exactly; validation uses fixed windows and a fixed seed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.data.sampling import EvalCoverage
from lmforge.data.windows import eval_starts, window_coverage, window_starts
from lmforge.train.job import PretrainContext, PretrainParts

IGNORE = -100
EVAL_SEED = 20250521


def _rng(seed: int, step: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, step, index])


# ---- T5 span corruption ------------------------------------------------------------------------

def random_spans_noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (length,) of noise tokens, as T5's random_spans_noise_mask: round(length*density)
    noise tokens in round(noise/mean_span) spans, noise and non-noise spans alternating, starting
    with non-noise."""
    n_noise = int(round(length * density))
    n_noise = min(max(n_noise, 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)

    def split(n_items: int, n_segments: int) -> np.ndarray:
        # a random composition of n_items into n_segments positive parts
        marks = np.zeros(n_items - 1, dtype=bool)
        marks[rng.choice(n_items - 1, n_segments - 1, replace=False)] = True
        ids = np.concatenate([[0], np.cumsum(marks)])
        return np.bincount(ids, minlength=n_segments)

    noise_lens, keep_lens = split(n_noise, n_spans), split(length - n_noise, n_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_lens, noise_lens):
        pos += keep
        mask[pos:pos + noise] = True
        pos += noise
    return mask


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos: int) -> tuple[list[int], list[int]]:
    """(source, target) of one window: each noise span -> one sentinel in the source; the target
    lists sentinel, span tokens, ... and both end with EOS."""
    src: list[int] = []
    tgt: list[int] = []
    k = -1
    prev = False
    for tok, noisy in zip(tokens.tolist(), mask.tolist()):
        if noisy:
            if not prev:
                k += 1
                if k >= len(sentinels):
                    raise LMForgeError(f"a window has more noise spans than sentinels ({len(sentinels)}); raise "
                                       "objective.num_sentinels or lower train.seq_len")
                src.append(sentinels[k])
                tgt.append(sentinels[k])
            tgt.append(tok)
        else:
            src.append(tok)
        prev = noisy
    return src + [eos], tgt + [eos]


# ---- BART text infilling + sentence permutation -------------------------------------------------

def permute_sentences(tokens: np.ndarray, ends_sentence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The window's sentences (split after sentence-final tokens) in a random order."""
    cuts = np.flatnonzero(ends_sentence[tokens]) + 1
    parts = [p for p in np.split(tokens, cuts) if len(p)]
    if len(parts) < 2:
        return tokens
    return np.concatenate([parts[i] for i in rng.permutation(len(parts))])


def text_infill(tokens: np.ndarray, ratio: float, lam: float, mask_id: int, rng: np.random.Generator) -> list[int]:
    """Replace spans of Poisson(lam) length with one mask token each until round(ratio * len) tokens
    are covered (the last span is cut to fit); 0-length spans insert a mask."""
    n = len(tokens)
    budget = int(round(n * ratio))
    masked = np.zeros(n, dtype=bool)
    inserts = np.zeros(n + 1, dtype=bool)
    starts = np.zeros(n, dtype=bool)
    covered, tries = 0, 0
    while covered < budget and tries < 10 * n:
        tries += 1
        length = int(rng.poisson(lam))
        start = int(rng.integers(0, n))
        if length == 0:
            inserts[start] = True
            continue
        length = min(length, budget - covered)
        span = slice(start, min(start + length, n))
        if masked[span].any() or (start > 0 and masked[start - 1]) or (span.stop < n and masked[span.stop]):
            continue  # spans neither overlap nor touch, so every span leaves its own mask
        masked[span] = True
        starts[start] = True
        covered += span.stop - span.start
    out: list[int] = []
    for i, tok in enumerate(tokens.tolist()):
        if inserts[i]:
            out.append(mask_id)
        if starts[i]:
            out.append(mask_id)
        elif not masked[i]:
            out.append(tok)
    if inserts[n]:
        out.append(mask_id)
    return out


# ---- batches -----------------------------------------------------------------------------------

def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (source, target) pairs: input_ids, input_mask, decoder_input_ids (target shifted
    right after the decoder start token), decoder_mask, labels (-100 on padding)."""
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs)
    B = len(pairs)
    src = torch.full((B, S), pad_id, dtype=torch.long)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        lab[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    dec = torch.full((B, T), pad_id, dtype=torch.long)
    dec[:, 0] = start_id
    dec[:, 1:] = lab[:, :-1].masked_fill(lab[:, :-1] == IGNORE, pad_id)
    smask = torch.zeros(B, S, dtype=torch.bool)
    for i, (s, _) in enumerate(pairs):
        smask[i, :len(s)] = True
    return {"input_ids": src, "input_mask": smask, "decoder_input_ids": dec, "decoder_mask": lab != IGNORE,
            "labels": lab}


class Seq2SeqLMObjective:
    """Cross entropy of the target tokens (teacher forcing). Stats: loss, acc (top-1), tokens."""

    name = "seq2seq"
    loss_label = "cross entropy (nats/target token)"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits_BTV = model(batch["input_ids"], batch["decoder_input_ids"], src_mask_BS=batch["input_mask"],
                           tgt_mask_BT=batch["decoder_mask"])
        y_BT = batch["labels"]
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), ignore_index=IGNORE)
        sel = y_BT != IGNORE
        acc = (logits_BTV.argmax(-1)[sel] == y_BT[sel]).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(),
                      "tokens": (batch["input_mask"].sum() + sel.sum()).detach()}


class DenoisingWindows:
    """Windows of the prepared token stream at hashed offsets, noised by `noise(window, rng)`."""

    def __init__(self, tokens: np.ndarray, length: int, micro_batch_size: int, per_step: int, seed: int,
                 noise: Any, pad_id: int, start_id: int, name: str = "train split"):
        if len(tokens) < length + 1:
            raise LMForgeError(f"the {name} has {len(tokens)} tokens, fewer than a window ({length + 1}); "
                               "lower train.seq_len or prepare more data")
        self.tokens, self.length, self.mb, self.per_step, self.seed = tokens, length, micro_batch_size, per_step, seed
        self.noise, self.pad_id, self.start_id = noise, pad_id, start_id

    def pairs(self, starts: np.ndarray, rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
        return [self.noise(np.asarray(self.tokens[s:s + self.length]).astype(np.int64), rng) for s in starts]

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        starts = window_starts(self.seed, step, self.mb * self.per_step, len(self.tokens), self.length)
        mine = starts[index * self.mb:(index + 1) * self.mb]
        return collate(self.pairs(mine, _rng(self.seed, step, index)), self.pad_id, self.start_id)

    def eval_batches(self, tokens: np.ndarray, n_batches: int) -> list[dict[str, torch.Tensor]]:
        if len(tokens) < self.length + 1:
            raise LMForgeError(f"the val split has {len(tokens)} tokens, fewer than a window ({self.length + 1})")
        starts = eval_starts(len(tokens), self.length, self.mb * n_batches)
        out = []
        for i in range(n_batches):
            rng = _rng(EVAL_SEED, 0, i)
            chunk = starts[i * self.mb:(i + 1) * self.mb]
            pairs = [self.noise(np.asarray(tokens[s:s + self.length]).astype(np.int64), rng) for s in chunk]
            out.append(collate(pairs, self.pad_id, self.start_id))
        return out

    def eval_coverage(self, tokens: np.ndarray, n_batches: int) -> EvalCoverage:
        """How much of the split eval_batches(tokens, n_batches) reads."""
        return window_coverage(eval_starts(len(tokens), self.length, self.mb * n_batches), self.length, len(tokens))


def _check_ids(ctx: PretrainContext) -> None:
    cfg, tok = ctx.model_cfg, ctx.tokenizer
    if getattr(cfg, "arch", None) is None:
        raise LMForgeError("span_corruption / text_infilling train a seq2seq model (model.preset t5-cpu, bart-cpu, ...)")
    for name, want in (("eos_id", tok.eos_id), ("pad_id", tok.pad_id)):
        if want is not None and getattr(cfg, name) != want:
            raise LMForgeError(f"model.{name} is {getattr(cfg, name)} but the data's tokenizer uses {want}; "
                               f"set --model.{name} {want}")


def _opt(opts: Any, name: str, default: Any) -> Any:
    return getattr(opts, name, default) if opts is not None else default


def sentinel_ids(tok: Any, vocab_size: int, n: int) -> list[int]:
    """<extra_id_i> of the tokenizer when it has them, else the last n rows of the model vocabulary
    (which must lie beyond the tokenizer's vocabulary)."""
    named = [tok.token_to_id(f"<extra_id_{i}>") for i in range(n)]
    if all(i is not None for i in named):
        return named  # type: ignore[return-value]
    if vocab_size - n < tok.vocab_size:
        raise LMForgeError(f"span_corruption needs {n} sentinel ids after the tokenizer's {tok.vocab_size} tokens; "
                           f"set --model.vocab_size {tok.vocab_size + n} (or lower objective.num_sentinels)")
    return [vocab_size - 1 - i for i in range(n)]


def make_span_corruption(ctx: PretrainContext) -> PretrainParts:
    _check_ids(ctx)
    cfg, tok, opts = ctx.model_cfg, ctx.tokenizer, ctx.options
    density = float(_opt(opts, "noise_density", 0.15))
    mean_span = float(_opt(opts, "mean_span_length", 3.0))
    if not 0.0 < density < 1.0 or mean_span < 1.0:
        raise LMForgeError(f"objective.noise_density must be in (0, 1) and objective.mean_span_length >= 1, "
                           f"got {density} and {mean_span}")
    sentinels = sentinel_ids(tok, cfg.vocab_size, int(_opt(opts, "num_sentinels", 100)))
    length = ctx.seq_len - 1  # the source is shorter than the window plus its EOS

    def noise(window: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        return span_corrupt(window, random_spans_noise_mask(len(window), density, mean_span, rng), sentinels, cfg.eos_id)

    n_noise = int(round(length * density))
    if n_noise + int(round(n_noise / mean_span)) + 1 > cfg.block_size:
        raise LMForgeError(f"span-corruption targets ({n_noise} noise tokens) exceed model.block_size {cfg.block_size}")
    train = DenoisingWindows(ctx.train_tokens, length, ctx.micro_batch_size, ctx.micro_batches_per_step, ctx.seed,
                             noise, cfg.pad_id, cfg.decoder_start_id)
    return PretrainParts(Seq2SeqLMObjective(), train, lambda: train.eval_batches(ctx.val_tokens, ctx.eval_iters),
                         eval_coverage=train.eval_coverage(ctx.val_tokens, ctx.eval_iters))


def sentence_ends(tok: Any, vocab_size: int) -> np.ndarray:
    """Per vocabulary id: its text ends a sentence (. ! ? possibly followed by quotes or whitespace)."""
    ends = np.zeros(vocab_size, dtype=bool)
    for i in range(min(vocab_size, tok.vocab_size)):
        text = tok.decode([i]).rstrip().rstrip("'\")]")
        ends[i] = text.endswith((".", "!", "?"))
    return ends


def mask_id_of(tok: Any) -> int:
    for name in ("<mask>", "<|mask|>", "[MASK]"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise LMForgeError("text_infilling needs a mask token (<mask> or <|mask|>) in the data's tokenizer")


def make_text_infilling(ctx: PretrainContext) -> PretrainParts:
    _check_ids(ctx)
    cfg, tok, opts = ctx.model_cfg, ctx.tokenizer, ctx.options
    ratio = float(_opt(opts, "infill_ratio", 0.3))
    lam = float(_opt(opts, "poisson_lambda", 3.0))
    permute = bool(_opt(opts, "permute_sentences", True))
    if not 0.0 < ratio < 1.0 or lam <= 0:
        raise LMForgeError(f"objective.infill_ratio must be in (0, 1) and objective.poisson_lambda > 0, got {ratio}, {lam}")
    mask_id = mask_id_of(tok)
    ends = sentence_ends(tok, cfg.vocab_size) if permute else None
    length = ctx.seq_len - 1

    def noise(window: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        shuffled = permute_sentences(window, ends, rng) if ends is not None else window
        return text_infill(shuffled, ratio, lam, mask_id, rng) + [cfg.eos_id], window.tolist() + [cfg.eos_id]

    train = DenoisingWindows(ctx.train_tokens, length, ctx.micro_batch_size, ctx.micro_batches_per_step, ctx.seed,
                             noise, cfg.pad_id, cfg.decoder_start_id)
    return PretrainParts(Seq2SeqLMObjective(), train, lambda: train.eval_batches(ctx.val_tokens, ctx.eval_iters),
                         eval_coverage=train.eval_coverage(ctx.val_tokens, ctx.eval_iters))
