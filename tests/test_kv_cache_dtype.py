"""`kv_cache_dtype` (vLLM's `--kv-cache-dtype`): a bf16 cache holds half the bytes, and the scheduler
with a bf16 cache equals `LLM.generate` with a bf16 cache, token for token."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import build_parser
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.nn.kv_cache import kv_cache_dtype
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine
from lmforge.tokenizer import Tokenizer

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm() -> LLM:
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    cfg = config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64, init_std=0.3, pos_encoding="rope",
                             n_kv_head=2)
    return LLM(Decoder(cfg).eval(), cfg, tok)


def test_names_and_memory(llm):
    assert [kv_cache_dtype(n) for n in ("auto", "fp32", "bf16")] == [None, torch.float32, torch.bfloat16]
    with pytest.raises(LMForgeError, match="^kv_cache_dtype must be 'auto', 'fp32' or 'bf16', got 'int8'$"):
        kv_cache_dtype("int8")
    fp32 = llm.model.new_cache(4, 64, dtype=kv_cache_dtype("fp32"))
    bf16 = llm.model.new_cache(4, 64, dtype=kv_cache_dtype("bf16"))
    assert bf16.dtype == torch.bfloat16 and 2 * bf16.nbytes() == fp32.nbytes() == 2 * 2 * 4 * 64 * 2 * 16 * 4


def requests(llm: LLM) -> list[GenerationRequest]:
    ids = llm.tokenizer.encode("ROMEO: but soft, what light through yonder window breaks? hello world")
    reqs = []
    for i in range(8):
        p = ids[i % 5: i % 5 + 2 + (7 * i) % 19]
        if i % 2 == 0:
            reqs.append(GenerationRequest(p, max_tokens=12, temperature=0, stop=["e "] if i % 4 == 0 else ()))
        else:
            reqs.append(GenerationRequest(p, max_tokens=12, temperature=0.8, seed=100 + i, top_k=40 if i % 3 else None,
                                          repetition_penalty=1.3 if i == 1 else 1.0))
    return reqs


def test_scheduler_with_bf16_cache_equals_llm_generate_with_bf16(llm):
    reqs = requests(llm)
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=8, kv_cache_dtype="bf16").start()
    try:
        assert sched.cache.dtype == torch.bfloat16
        got = run_all(sched, reqs)
    finally:
        sched.stop()
    fp32_differs = False
    for r, g in zip(reqs, got):
        opts = dict(max_new_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k,
                    repetition_penalty=r.repetition_penalty, stop=list(r.stop) or None, seed=r.seed)
        assert g.token_ids == llm.generate(r.prompt_ids, kv_cache_dtype="bf16", **opts)
        fp32_differs |= g.token_ids != llm.generate(r.prompt_ids, kv_cache_dtype="fp32", **opts)
    assert fp32_differs  # the cache's rounding shows: the comparison above is with the bf16 path


def test_stream_chat_and_beams_take_the_setting(llm):
    text = llm.generate("ROMEO:", max_new_tokens=16, temperature=0.9, seed=1, kv_cache_dtype="bf16")
    assert "".join(llm.stream("ROMEO:", max_new_tokens=16, temperature=0.9, seed=1, kv_cache_dtype="bf16")) == text
    beams = llm.generate("ROMEO:", max_new_tokens=8, num_beams=3, kv_cache_dtype="bf16")
    assert beams == llm.generate("ROMEO:", max_new_tokens=8, num_beams=3, kv_cache_dtype="bf16")
    with pytest.raises(LMForgeError, match="^kv_cache_dtype must be 'auto', 'fp32' or 'bf16', got 'fp8'$"):
        llm.stream("ROMEO:", max_new_tokens=4, kv_cache_dtype="fp8")


def test_server_and_cli_take_the_flags(llm):
    engine = Engine.from_llm(llm, ServerConfig(max_batch=2, kv_cache_dtype="bf16"))
    engine.scheduler.stop()
    assert engine.scheduler.cache.dtype == torch.bfloat16
    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "bf16", "--draft", "d",
                                      "--num-draft-tokens", "2"])
    assert (args.kv_cache_dtype, args.draft, args.num_draft_tokens) == ("bf16", "d", 2)
    args = build_parser().parse_args(["chat", "m"])
    assert args.kv_cache_dtype == "auto"
    short = Decoder(config_from_preset("tiny", vocab_size=llm.config.vocab_size, block_size=32))
    with pytest.raises(LMForgeError) as e:
        Scheduler(llm.model, llm.tokenizer, draft=short)
    assert str(e.value) == ("the draft's context (32 tokens) is shorter than the served length (64); set "
                            "--max-model-len to at most the draft's")
