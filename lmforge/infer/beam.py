"""Beam search for every generative family (decoders and encoder-decoders), and its decoder-only
entry point `beam_search_decoder`.

The search keeps `num_beams` running hypotheses per input. Each step scores all beams x vocab
continuations by accumulated log-probability, keeps the best 2*num_beams candidates (so that
num_beams of them are still running even if some just ended), moves candidates that ended (EOS,
or the length limit) among the top num_beams into the finished pool with score
sum_logprob / generated_length ** length_penalty, and reorders the model cache so each surviving
beam carries its parent's keys and values.

Stopping follows Hugging Face `generate` exactly (same tie-breaks, same tensors), so the same
settings give the same tokens:
- early_stopping=True: an input is done once it has num_beams finished hypotheses;
- early_stopping=False (default): done once the best running beam, scored at the current length,
  cannot beat the worst finished one;
- early_stopping="never": as False, but with a positive length penalty the running beam is scored
  at the maximum length (the canonical, slower rule).

The model side is two callables: `prefill()` returns the next-token logits of every row
(batch*num_beams rows, beams of one input adjacent) and `step(tokens_R)` feeds one new token per
row and returns the next logits; `reorder(rows_R)` permutes the model's cache rows (`KVCache.reorder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.infer.generate import Generation, check_prompts, left_pad, stop_id_set
from lmforge.nn.kv_cache import kv_cache_dtype as cache_dtype_of


@dataclass(frozen=True)
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0  # >0 favours longer outputs (score = logprob / length**length_penalty)
    early_stopping: bool | str = False  # True | False | "never"
    no_repeat_ngram_size: int = 0  # forbid any n-gram of this size from occurring twice
    num_return_sequences: int = 1  # best hypotheses returned per input (<= num_beams)

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise LMForgeError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if (isinstance(self.num_return_sequences, bool) or not isinstance(self.num_return_sequences, int)
                or not 1 <= self.num_return_sequences <= self.num_beams):
            raise LMForgeError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                               f"got {self.num_return_sequences!r}")
        if self.early_stopping not in (True, False, "never"):
            raise LMForgeError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if isinstance(self.no_repeat_ngram_size, bool) or not isinstance(self.no_repeat_ngram_size, int) \
                or self.no_repeat_ngram_size < 0:
            raise LMForgeError(f"no_repeat_ngram_size must be a non-negative integer, got {self.no_repeat_ngram_size!r}")


def ban_repeated_ngrams(scores_RV: torch.Tensor, seqs_RT: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that would complete an n-gram already present in its row (HF semantics:
    the whole row counts, prompt included)."""
    R, T = seqs_RT.shape
    if n <= 0 or T + 1 < n:
        return scores_RV
    rows = seqs_RT.tolist()
    for r, toks in enumerate(rows):
        prefix = tuple(toks[T + 1 - n:]) if n > 1 else ()
        banned = [toks[i + n - 1] for i in range(T - n + 1) if tuple(toks[i:i + n - 1]) == prefix]
        if banned:
            scores_RV[r, banned] = float("-inf")
    return scores_RV


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) gathered along dim 1 by idx (B, M)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return t.gather(1, idx.expand(*idx.shape[:2], *t.shape[2:]))


@torch.inference_mode()
def beam_search(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor],
                reorder: Callable[[torch.Tensor], None], prompt_RT: torch.Tensor, batch: int, max_new_tokens: int,
                stop_ids: Collection[int], pad_id: int | None, params: BeamParams,
                forced: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
                ) -> list[list[tuple[list[int], float]]]:
    """Beam search over `batch` inputs, each repeated num_beams times in `prompt_RT` (rows b*N..b*N+N-1).

    prompt_RT is what the n-gram rule sees as the start of every row (the decoder prompt, or the
    decoder start token). A hypothesis ends at any of `stop_ids` (EOS, a chat template's end of
    turn; transformers' list of eos_token_id). Returns, per input, num_return_sequences (new token
    ids, score) pairs, best first; ids stop before the stop id. `forced(logprobs_RV, n_generated, n_left)` may rewrite the
    log-probabilities of a step (forced BOS / EOS tokens).
    """
    N = params.num_beams
    device = prompt_RT.device
    T0 = prompt_RT.shape[1]
    max_len = T0 + max_new_tokens
    if max_new_tokens <= 0:
        return [[([], 0.0)] * params.num_return_sequences for _ in range(batch)]
    lp, early = params.length_penalty, params.early_stopping
    stops_X = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    K = max(2, 1 + len(stops_X)) * N  # candidates kept per step (transformers: 1 + number of EOS ids)
    top_n_mask_K = torch.zeros(K, dtype=torch.bool, device=device)
    top_n_mask_K[:N] = True
    fill = (pad_id or int(stops_X[0])) if len(stops_X) else -1  # beyond a hypothesis' end (never read)

    running_BNL = torch.full((batch, N, max_len), fill, dtype=torch.long, device=device)
    running_BNL[:, :, :T0] = prompt_RT.view(batch, N, T0)
    finished_BNL = running_BNL.clone()
    running_scores_BN = torch.zeros(batch, N, device=device)
    running_scores_BN[:, 1:] = -1e9  # all beams start identical: only the first may expand at step one
    finished_scores_BN = torch.full((batch, N), -1e9, device=device)
    is_finished_BN = torch.zeros(batch, N, dtype=torch.bool, device=device)
    improvable_B1 = torch.ones(batch, 1, dtype=torch.bool, device=device)
    lengths_BN = torch.zeros(batch, N, dtype=torch.long, device=device)  # generated tokens of finished beams

    cur = T0
    logits_RV = prefill()
    while True:
        logprobs_RV = torch.log_softmax(logits_RV.float(), dim=-1)
        if params.no_repeat_ngram_size:
            logprobs_RV = ban_repeated_ngrams(logprobs_RV, running_BNL.view(batch * N, max_len)[:, :cur],
                                              params.no_repeat_ngram_size)
        if forced is not None:
            logprobs_RV = forced(logprobs_RV, cur - T0, max_len - cur)
        V = logprobs_RV.shape[-1]
        acc_BX = (logprobs_RV.view(batch, N, V) + running_scores_BN[:, :, None]).view(batch, N * V)
        top_scores_BK, top_idx_BK = torch.topk(acc_BX, K)
        parent_BK = top_idx_BK // V
        token_BK = top_idx_BK % V
        cand_BKL = _gather(running_BNL, parent_BK)
        cand_BKL[:, :, cur] = token_BK
        ended_BK = torch.isin(token_BK, stops_X)
        if cur + 1 >= max_len:
            ended_BK[:] = True

        # Running beams for the next step: the best N candidates that did not end.
        masked_BK = top_scores_BK + ended_BK.float() * -1e9
        keep_BN = torch.topk(masked_BK, N)[1]
        new_running_BNL = _gather(cand_BKL, keep_BN)
        new_running_scores_BN = _gather(masked_BK, keep_BN)
        row_parent_BN = _gather(parent_BK, keep_BN)

        # Finished pool: merge in candidates among the top N that just ended.
        just_BK = ended_BK & top_n_mask_K[None]
        fin_scores_BK = top_scores_BK / ((cur + 1 - T0) ** lp)
        full_B1 = is_finished_BN.all(-1, keepdim=True) & (early is True)
        fin_scores_BK = fin_scores_BK + full_B1.float() * -1e9 + (~improvable_B1).float() * -1e9 + (~just_BK).float() * -1e9
        merged_scores = torch.cat([finished_scores_BN, fin_scores_BK], 1)
        pick_BN = torch.topk(merged_scores, N)[1]
        finished_BNL = _gather(torch.cat([finished_BNL, cand_BKL], 1), pick_BN)
        finished_scores_BN = _gather(merged_scores, pick_BN)
        is_finished_BN = _gather(torch.cat([is_finished_BN, just_BK], 1), pick_BN)
        lengths_BN = _gather(torch.cat([lengths_BN, torch.full_like(token_BK, cur + 1 - T0)], 1), pick_BN)

        running_BNL, running_scores_BN = new_running_BNL, new_running_scores_BN
        cur += 1
        # Can a running beam still beat the worst finished one?
        best_len = (max_len - T0) if (early == "never" and lp > 0.0) else (cur - T0)
        best_running_B1 = running_scores_BN[:, :1] / (best_len ** lp)
        worst_fin_B1 = torch.where(is_finished_BN, finished_scores_BN.min(1, keepdim=True)[0], torch.tensor(-1e9, device=device))
        improvable_B1 = improvable_B1 & (best_running_B1 > worst_fin_B1).any(-1, keepdim=True)
        go_on = bool(improvable_B1.any()) and not (bool(is_finished_BN.all()) and early is True) and not bool(ended_BK.all())
        if not go_on:
            break
        rows_R = (row_parent_BN + torch.arange(batch, device=device)[:, None] * N).view(-1)
        reorder(rows_R)
        logits_RV = step(running_BNL.view(batch * N, max_len)[:, cur - 1])

    out: list[list[tuple[list[int], float]]] = []
    for b in range(batch):
        hyps = []
        for j in range(params.num_return_sequences):
            ids = finished_BNL[b, j, T0:T0 + int(lengths_BN[b, j])].tolist()
            ids = ids[:next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))]
            hyps.append((ids, float(finished_scores_BN[b, j])))
        out.append(hyps)
    return out


@torch.inference_mode()
def beam_search_decoder(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                        num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                        no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                        eos_id: int | Iterable[int] | None = None, pad_id: int | None = None, tokenizer: Any = None,
                        decode_text: bool = True, kv_cache_dtype: str | None = None,
                        ) -> list[Generation] | list[list[Generation]]:
    """Beam search for a decoder-only model (left-padded batch of prompts, KV cache reordered per step).
    eos_id: one id or several (EOS and a chat template's end of turn); a beam ends at any of them."""
    beam = BeamParams(num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences)
    n_new = check_prompts(model, prompts, max_new_tokens)
    device = model.tok_emb.weight.device
    B, N = len(prompts), beam.num_beams
    idx_BT, pad_mask_BT = left_pad(prompts, pad_id if pad_id is not None else 0, device)
    idx_RT = idx_BT.repeat_interleave(N, 0)
    mask_RT = pad_mask_BT.repeat_interleave(N, 0) if pad_mask_BT is not None else None
    T = idx_RT.shape[1]
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B * N, T + max(n_new, 1), dtype=cache_dtype_of(kv_cache_dtype))
        results = beam_search(
            prefill=lambda: model(idx_RT, pad_mask_BT=mask_RT, cache=cache, last_only=True)[:, -1],
            step=lambda tok_R: model(tok_R[:, None], cache=cache)[:, -1],
            reorder=cache.reorder, prompt_RT=idx_RT, batch=B, max_new_tokens=n_new, stop_ids=stop_id_set(eos_id),
            pad_id=pad_id, params=beam)
    finally:
        model.train(was_training)
    out = []
    for hyps in results:
        gens = []
        for ids, _ in hyps:
            text = tokenizer.decode(ids) if tokenizer is not None and decode_text else None
            gens.append(Generation(ids, text, "eos" if len(ids) < n_new else "length"))
        out.append(gens if num_return_sequences > 1 else gens[0])
    return out
