"""`LLM.generate` for decoder-only (causal) language models: the continuation of each prompt, by
sampling / greedy decoding (infer/generate.py) or beam search (infer/beam.py).

Results come in the shape of the prompt (infer/prompt.results_like): text for a string, new token
ids for a list of ids, a list for a list of strings; num_samples > 1 gives a list per prompt
(independent samples, or the best hypotheses of beam search). With a `Speculation` the rows decode
by speculative decoding (infer/speculative.py) and `llm.last_stats` holds what it achieved.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmforge.errors import LMForgeError
from lmforge.infer.beam import beam_search_decoder
from lmforge.infer.generate import generate, normalize_stop
from lmforge.infer.grammar import Grammar
from lmforge.infer.prompt import cut_at_stops, results_like
from lmforge.infer.speculative import Speculation, generate_speculative


def generate_for_llm(llm: Any, prompt: Any, *, max_new_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, repetition_penalty: float, seed: int | None, num_samples: int,
                     num_beams: int, length_penalty: float, early_stopping: bool | str, no_repeat_ngram_size: int,
                     stop: str | Sequence[str] | None, kv_cache_dtype: str | None = None,
                     speculation: Speculation | None = None, grammar: Grammar | None = None) -> Any:
    kind, prompts = llm.prompt_batch(prompt)
    if speculation is not None and num_beams > 1:
        raise LMForgeError("speculative decoding does not combine with beam search; use num_beams=1")
    if num_beams == 1:
        rows = [p for p in prompts for _ in range(num_samples)]
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, eos_id=llm.stop_ids, stop=stop,
                       tokenizer=llm.tokenizer, seed=seed, decode_text=kind != "ids", kv_cache_dtype=kv_cache_dtype)
        if speculation is None:
            gens = generate(llm.model, rows, pad_id=llm.pad_id, grammar=grammar, **options)
        else:
            gens, llm.last_stats = generate_speculative(llm.model, rows, speculation, **options)
        outs = [g.ids if kind == "ids" else g.text for g in gens]
        return results_like(kind, [outs[i:i + num_samples] if num_samples > 1 else outs[i]
                                   for i in range(0, len(outs), num_samples)])
    if num_samples > num_beams:
        raise LMForgeError(f"beam search returns at most num_beams ({num_beams}) results, asked for {num_samples}")
    stops = normalize_stop(stop)
    rows = beam_search_decoder(llm.model, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                               length_penalty=length_penalty, early_stopping=early_stopping,
                               no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_samples,
                               eos_id=llm.stop_ids, pad_id=llm.pad_id, tokenizer=llm.tokenizer,
                               decode_text=kind != "ids", kv_cache_dtype=kv_cache_dtype)

    def out(g: Any) -> Any:
        return g.ids if kind == "ids" else cut_at_stops(g.text or "", stops)

    return results_like(kind, [[out(g) for g in r] if isinstance(r, list) else out(r) for r in rows])
