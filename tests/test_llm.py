"""`LLM`: loading (model dir, run dir, HF dir dispatch) and the generate / stream / model contract."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import write_model_dir
from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate_ids
from lmforge.infer.llm import LLM
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import Tokenizer

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3,
          "héllo wörld 日本語 — the quick brown fox jumps over the lazy dog. " * 3]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm")
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    tok.save(root / "tok.json")
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64, init_std=0.3))
    return write_model_dir(root / "model", model, root / "tok.json")


def test_generate_types_and_values(model_dir):
    llm = LLM.load(model_dir)
    ids = llm.tokenizer.encode("hello world")
    new = llm.generate(ids, max_new_tokens=12, temperature=0)
    assert isinstance(new, list) and all(isinstance(i, int) for i in new)
    # The same as the engine called directly (prompt ids are not repeated in the result).
    assert new == generate_ids(llm.model, [ids], max_new_tokens=12, temperature=0, eos_id=llm.tokenizer.eos_id)[0]
    assert new == GOLDEN_GREEDY_IDS
    text = llm.generate("hello world", max_new_tokens=12, temperature=0)
    assert text == llm.tokenizer.decode(new)
    assert len(new) == 12 or llm.tokenizer.eos_id not in new

    batch = llm.generate(["hello world", "ROMEO: but", "the"], max_new_tokens=12, temperature=0)
    assert batch[0] == text
    assert batch == [llm.generate(p, max_new_tokens=12, temperature=0) for p in ["hello world", "ROMEO: but", "the"]]


# greedy ids after "hello world", measured once: a change means the model or the decoding changed
GOLDEN_GREEDY_IDS = [246, 150, 144, 144, 220, 246, 122, 279, 9, 273, 299, 59]


def test_sampling_num_samples_and_seed(model_dir):
    llm = LLM.load(model_dir)
    samples = llm.generate("hello", max_new_tokens=10, temperature=1.0, seed=7, num_samples=3)
    # a string prompt gives the decoded samples of its token ids, drawn from the same seed
    assert len(samples) == 3 and samples == [llm.tokenizer.decode(s) for s in llm.generate(
        llm.tokenizer.encode("hello"), max_new_tokens=10, temperature=1.0, seed=7, num_samples=3)]
    assert samples == llm.generate("hello", max_new_tokens=10, temperature=1.0, seed=7, num_samples=3)
    assert len(set(samples)) > 1
    grouped = llm.generate(["hello", "the"], max_new_tokens=5, temperature=1.0, seed=7, num_samples=2)
    assert [len(g) for g in grouped] == [2, 2]
    ids_samples = llm.generate([5, 6, 7], max_new_tokens=4, temperature=1.0, seed=1, num_samples=2)
    assert len(ids_samples) == 2 and all(isinstance(s, list) for s in ids_samples)


def test_stream_joins_to_generate(model_dir):
    llm = LLM.load(model_dir)
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)):
        pieces = list(llm.stream("ROMEO:", max_new_tokens=20, **kwargs))
        assert "".join(pieces) == llm.generate("ROMEO:", max_new_tokens=20, **kwargs)
    with pytest.raises(LMForgeError, match="stream takes one string prompt"):
        llm.stream([1, 2, 3])


def test_model_tokenizer_and_config(model_dir):
    llm = LLM.load(model_dir)
    assert isinstance(llm.model, Decoder) and not llm.model.training
    ids = llm.tokenizer.encode("héllo wörld")
    assert llm.tokenizer.decode(ids) == "héllo wörld"
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids, ids]))
    assert logits.shape == (2, len(ids), llm.tokenizer.vocab_size)
    assert llm.config.block_size == 64 and llm.config.vocab_size == 300
    from lmforge import LLM as top_level

    assert top_level is LLM


def test_empty_prompt_starts_from_eos(model_dir):
    llm = LLM.load(model_dir)
    eos = llm.tokenizer.eos_id
    (want,) = generate_ids(llm.model, [[eos]], max_new_tokens=6, temperature=0, eos_id=eos)
    assert llm.generate("", max_new_tokens=6, temperature=0) == llm.tokenizer.decode(want)


def test_load_run_directory_uses_latest_checkpoint(model_dir, tmp_path):
    run = tmp_path / "run"
    other = Decoder(config_from_preset("tiny", vocab_size=300, block_size=64, init_std=0.3))
    write_model_dir(run / "checkpoints" / "step_00000001", other, model_dir / "tokenizer.json")
    import shutil

    shutil.copytree(model_dir, run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    a = LLM.load(run).generate("hello", max_new_tokens=8, temperature=0)
    assert a == LLM.load(model_dir).generate("hello", max_new_tokens=8, temperature=0)


def test_model_without_tokenizer(model_dir, tmp_path):
    src = LLM.load(model_dir)
    bare = write_model_dir(tmp_path / "bare", src.model)
    llm = LLM.load(bare)
    assert llm.tokenizer is None
    with pytest.raises(LMForgeError) as e:
        llm.generate("hello")
    assert str(e.value) == (f"the model at {bare} has no tokenizer (no tokenizer.json), "
                            "so prompts must be lists of token ids")
    assert llm.generate([5, 6, 7], max_new_tokens=5, temperature=0) == \
        generate_ids(src.model, [[5, 6, 7]], max_new_tokens=5, temperature=0)[0]


def test_hugging_face_folder_goes_to_interop(model_dir, tmp_path, monkeypatch):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    src = LLM.load(model_dir)
    calls = []

    def fake_load_hf_dir(path, device="cpu"):
        calls.append((Path(path), device))
        return src.model, src.config, None

    import lmforge.interop.hf

    monkeypatch.setattr(lmforge.interop.hf, "load_hf_dir", fake_load_hf_dir)
    llm = LLM.load(hf_dir)
    assert calls == [(hf_dir, "cpu")]
    assert llm.model is src.model and llm.tokenizer is None


def test_load_errors(tmp_path):
    with pytest.raises(LMForgeError) as e:
        LLM.load(tmp_path / "missing")
    assert str(e.value) == f"checkpoint not found: {tmp_path / 'missing'}"
    with pytest.raises(LMForgeError, match="holds no lmforge checkpoint"):
        LLM.load(tmp_path)


def test_prompt_type_errors(model_dir):
    llm = LLM.load(model_dir)
    with pytest.raises(LMForgeError, match="prompt must be a string, a list of strings or a list of token ids"):
        llm.generate([1, "a"])
    with pytest.raises(LMForgeError, match="num_samples must be a positive integer"):
        llm.generate("hi", num_samples=0)
    with pytest.raises(LMForgeError) as e:
        llm.generate("hello " * 80, max_new_tokens=1)
    assert str(e.value).startswith("prompt has ") and str(e.value).endswith(" tokens but the model's context is 64")


def _placement(model: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


def test_load_puts_weights_and_buffers_on_the_requested_device(model_dir):
    """The weights are assigned, not copied, into the model: they must be moved first (a CUDA load
    once kept them on the CPU). The meta device stands in for CUDA here; tests/test_cuda.py runs it."""
    from lmforge.models.registry import load_model_dir

    assert _placement(load_model_dir(model_dir, device="meta")[0]) == {"meta"}
    assert _placement(LLM.load(model_dir).model) == {"cpu"}
