"""Generation for encoder-decoder models.

    sources --encoder (once)--> memory --cross-attention K/V (once per layer)--> cache
    decoder_start --decoder step (self-attention cache grows one slot)--> logits --> token ...

Sources of different lengths share a batch through RIGHT padding plus a source mask (the
encoder's positions count from the first slot, as in T5 and BART); every decoder row starts with
the model's decoder start token at the same slot, so decoding never needs padding. Greedy and
sampling reuse the decoder engine's token selection (`sampling.py`); `num_beams > 1` runs the
shared beam search (`beam.py`). Results are the new target ids without the decoder start token
and without the EOS.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.infer.beam import BeamParams, beam_search
from lmforge.infer.generate import Generation, normalize_stop
from lmforge.infer.prompt import cut_at_stops, results_like
from lmforge.infer.sampling import SamplingParams, make_generator, sample_next
from lmforge.nn.kv_cache import kv_cache_dtype as cache_dtype_of


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), S, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def forced_tokens(cfg: Any) -> Any:
    """HF's ForcedBOS / ForcedEOS processors: (scores_RV, n_generated, n_left) -> scores with every
    token but the forced one at -inf on the first step (BOS) and on the last allowed step (EOS)."""
    bos, eos = getattr(cfg, "forced_bos_id", None), getattr(cfg, "forced_eos_id", None)
    if bos is None and eos is None:
        return None

    def apply(scores_RV: torch.Tensor, n_generated: int, n_left: int) -> torch.Tensor:
        tok = bos if n_generated == 0 and bos is not None else eos if n_left == 1 and eos is not None else None
        if tok is None:
            return scores_RV
        out = torch.full_like(scores_RV, float("-inf"))
        out[:, tok] = 0.0
        return out

    return apply


def _check_sources(model: torch.nn.Module, sources: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise LMForgeError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if len(sources) == 0:
        raise LMForgeError("no prompts given")
    cfg = model.cfg
    for s in sources:
        if len(s) == 0:
            raise LMForgeError("source is empty; give at least one token")
        lo, hi = min(s), max(s)
        if lo < 0 or hi >= cfg.vocab_size:
            raise LMForgeError(f"source token id {lo if lo < 0 else hi} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
        if len(s) > cfg.block_size:
            raise LMForgeError(f"source has {len(s)} tokens but the model takes at most {cfg.block_size}")
    # The decoder holds the start token plus the new tokens (the last one never fed back).
    return min(max_new_tokens, cfg.block_size)


@torch.inference_mode()
def generate_seq2seq(model: torch.nn.Module, sources: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: bool | str = False, no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                     eos_id: int | None = None, seed: int | None = None, tokenizer: Any = None,
                     decode_text: bool = True, kv_cache_dtype: str | None = None,
                     ) -> list[Generation] | list[list[Generation]]:
    """Targets for a batch of token-id sources. One `Generation` per source, or with
    num_return_sequences > 1 a list of that many per source (best first for beam search).
    eos_id defaults to the model config's; `kv_cache_dtype` as for decoders ("auto", "fp32", "bf16")."""
    cache_dtype = cache_dtype_of(kv_cache_dtype)
    cfg = model.cfg
    eos = cfg.eos_id if eos_id is None else eos_id
    n_new = _check_sources(model, sources, max_new_tokens)
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    try:
        src_BS, mask_BS = right_pad(sources, cfg.pad_id, device)
        if num_beams > 1 or num_return_sequences > 1 and temperature == 0:
            beam = BeamParams(num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences)
            rows = _beam(model, src_BS, mask_BS, n_new, eos, beam, cache_dtype)
        else:
            params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
            reps = num_return_sequences
            if reps > 1:
                src_BS, mask_BS = src_BS.repeat_interleave(reps, 0), mask_BS.repeat_interleave(reps, 0)
            rows = [[r] for r in _sample(model, src_BS, mask_BS, n_new, eos, params, no_repeat_ngram_size,
                                         None if params.greedy else make_generator(device, seed), cache_dtype)]
            if reps > 1:
                rows = [[rows[i + j][0] for j in range(reps)] for i in range(0, len(rows), reps)]
    finally:
        model.train(was_training)
    out = []
    for hyps in rows:
        gens = []
        for ids, reason in hyps:
            text = tokenizer.decode(ids, skip_special=True) if tokenizer is not None and decode_text else None
            gens.append(Generation(ids, text, reason))
        out.append(gens if num_return_sequences > 1 else gens[0])
    return out


def _sample(model: torch.nn.Module, src_BS: torch.Tensor, mask_BS: torch.Tensor, n_new: int, eos: int,
            params: SamplingParams, no_repeat: int, generator: torch.Generator | None,
            cache_dtype: torch.dtype | None) -> list[tuple[list[int], str]]:
    cfg = model.cfg
    B = src_BS.shape[0]
    device = src_BS.device
    if n_new == 0:
        return [([], "length") for _ in range(B)]
    memory_BSC = model.encode(src_BS, mask_BS)
    cache = model.new_cache(B, n_new, src_mask_BS=mask_BS, dtype=cache_dtype)
    seq_BT = torch.full((B, 1), cfg.decoder_start_id, dtype=torch.long, device=device)
    seen_BV = None
    if params.repetition_penalty != 1.0:
        seen_BV = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        seen_BV[:, cfg.decoder_start_id] = True  # HF counts the decoder start token as seen
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    forced = forced_tokens(cfg)
    logits_BV = model.decode(seq_BT, memory_BSC, cache=cache)[:, -1]
    for step in range(n_new):
        if forced is not None:
            logits_BV = forced(logits_BV.float(), step, n_new - step)
        if no_repeat:
            from lmforge.infer.beam import ban_repeated_ngrams

            logits_BV = ban_repeated_ngrams(logits_BV.float().clone(), seq_BT, no_repeat)
        tok_B = sample_next(logits_BV, params, generator, seen_BV)
        tok_B = torch.where(done_B, torch.full_like(tok_B, cfg.pad_id), tok_B)
        seq_BT = torch.cat([seq_BT, tok_B[:, None]], 1)
        done_B |= tok_B == eos
        if bool(done_B.all()) or step + 1 == n_new:
            break
        if seen_BV is not None:
            seen_BV.scatter_(1, tok_B[:, None], True)
        logits_BV = model.decode(tok_B[:, None], None, cache=cache)[:, -1]
    out = []
    for row in seq_BT[:, 1:].tolist():
        if eos in row:
            out.append((row[:row.index(eos)], "eos"))
        else:
            out.append((row, "length"))
    return out


def _beam(model: torch.nn.Module, src_BS: torch.Tensor, mask_BS: torch.Tensor, n_new: int, eos: int,
          beam: BeamParams, cache_dtype: torch.dtype | None) -> list[list[tuple[list[int], str]]]:
    cfg = model.cfg
    B, N = src_BS.shape[0], beam.num_beams
    device = src_BS.device
    # Encode each source once, then give every beam its own view of the memory.
    memory_BSC = model.encode(src_BS, mask_BS).repeat_interleave(N, 0)
    mask_RS = mask_BS.repeat_interleave(N, 0)
    cache = model.new_cache(B * N, max(n_new, 1), src_mask_BS=mask_RS, dtype=cache_dtype)
    start_R1 = torch.full((B * N, 1), cfg.decoder_start_id, dtype=torch.long, device=device)
    results = beam_search(
        prefill=lambda: model.decode(start_R1, memory_BSC, cache=cache)[:, -1],
        step=lambda tok_R: model.decode(tok_R[:, None], None, cache=cache)[:, -1],
        reorder=cache.reorder, prompt_RT=start_R1, batch=B, max_new_tokens=n_new, stop_ids={eos}, pad_id=cfg.pad_id,
        params=beam, forced=forced_tokens(cfg))
    return [[(ids, "eos" if len(ids) < n_new else "length") for ids, _ in hyps] for hyps in results]


def generate_for_llm(llm: Any, prompt: Any, *, max_new_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, repetition_penalty: float, seed: int | None, num_samples: int, num_beams: int,
                     length_penalty: float, early_stopping: bool | str, no_repeat_ngram_size: int,
                     stop: str | Sequence[str] | None, kv_cache_dtype: str | None = None) -> Any:
    """`LLM.generate` for encoder-decoders: the generated target of each source (greedy, sampling or
    beam search). Results come in the shape of the prompt, as for decoders (infer/prompt.results_like);
    num_samples > 1 gives a list per prompt (the best hypotheses for beam search). Stop strings cut the
    returned text after generation."""
    kind, prompts = llm.prompt_batch(prompt)
    model = llm.model
    stops = normalize_stop(stop)
    eos = model.cfg.eos_id
    if kind != "ids":  # text sources end with the EOS, as T5 / BART tokenizers make them
        prompts = [p if p and p[-1] == eos else [*p, eos] for p in prompts]
    if num_beams > 1 or temperature == 0:
        rows = generate_seq2seq(model, prompts, max_new_tokens=max_new_tokens, temperature=0,
                                repetition_penalty=repetition_penalty, num_beams=num_beams,
                                length_penalty=length_penalty, early_stopping=early_stopping,
                                no_repeat_ngram_size=no_repeat_ngram_size,
                                num_return_sequences=num_samples if num_beams > 1 else 1,
                                tokenizer=llm.tokenizer, decode_text=kind != "ids", kv_cache_dtype=kv_cache_dtype)
        if num_beams == 1 and num_samples > 1:  # greedy: every sample is the same
            rows = [[r] * num_samples for r in rows]
    else:
        rows = generate_seq2seq(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_samples,
                                seed=seed, tokenizer=llm.tokenizer, decode_text=kind != "ids",
                                kv_cache_dtype=kv_cache_dtype)

    def out(g: Generation) -> Any:
        return g.ids if kind == "ids" else cut_at_stops(g.text or "", stops)

    return results_like(kind, [[out(g) for g in r] if isinstance(r, list) else out(r) for r in rows])
