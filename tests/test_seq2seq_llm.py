"""T5 / BART folders with their tokenizers through `LLM`
against transformers (tokenizer ids, greedy and beam-search text); beam search for decoders in LLM."""

from __future__ import annotations


import pytest
import torch

from reference_libs import reference_lib
transformers = reference_lib("transformers")

from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402

WORDS = "the king is dead long live queen stand and unfold your self".split()


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if p.dim() == 1 and "norm" in name and name.endswith("weight") else noise)


def t5_folder(path):
    """A T5 folder whose tokenizer transformers builds itself (SentencePiece-style Unigram tokenizer.json)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0 - i * 0.1) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(3, -1, -1)]
    tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=4)
    cfg = transformers.T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(cfg)
    _randomize(model, 0)
    with torch.no_grad():
        model.shared.weight[1] *= 2.0  # EOS now and then
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def bart_folder(path):
    """A BART folder with a byte-level BPE tokenizer (RoBERTa-style, as BART's)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(set(bytes_to_unicode().values()))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "k"), ("i", "n"), ("Ġk", "in"), ("Ġkin", "g")]
    for m in merges:
        vocab["".join(m)] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tok = transformers.RobertaTokenizer(vocab=vocab, merges=merges)
    cfg = transformers.BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
                                  decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0, forced_eos_token_id=None)
    model = transformers.BartForConditionalGeneration(cfg)
    _randomize(model, 1)
    with torch.no_grad():
        model.final_logits_bias[0, 2] = 3.0
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _hf_text(model, tok, text, **kw):
    enc = tok([text], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, forced_eos_token_id=None, forced_bos_token_id=None,
                         **kw)
    return [tok.decode(row, skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("make", [t5_folder, bart_folder])
def test_llm_loads_hf_folder_tokenizer_and_generates_like_transformers(make, tmp_path):
    model, tok = make(tmp_path / "hf")
    llm = LLM.load(tmp_path / "hf")
    assert getattr(llm.model, "family", None) == "seq2seq"
    text = "the king is dead , long live the queen"
    assert llm.tokenizer.encode_prompt(text) == tok(text)["input_ids"]  # same ids, EOS (and BART's <s>) included
    greedy = llm.generate(text, max_new_tokens=8, temperature=0)
    assert greedy == _hf_text(model, tok, text)[0] and greedy.strip()
    beams = llm.generate(text, max_new_tokens=8, temperature=0, num_beams=3, num_samples=2)
    assert beams == _hf_text(model, tok, text, num_beams=3, num_return_sequences=2)
    ids = tok(text)["input_ids"]
    new_ids = llm.generate(ids, max_new_tokens=8, temperature=0)
    assert llm.tokenizer.decode(new_ids, skip_special=True) == greedy  # ids in -> new ids out
    batch = llm.generate([text, "stand and unfold your self"], max_new_tokens=8, temperature=0)
    assert batch[0] == _hf_text(model, tok, text)[0]
    assert batch[1] == _hf_text(model, tok, "stand and unfold your self")[0]


def test_decoder_beam_search_through_llm(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    _randomize(hf, 2)
    hf.eval().save_pretrained(tmp_path)
    llm = LLM.load(tmp_path)
    prompt = [5, 6, 7, 8]
    got = llm.generate(prompt, max_new_tokens=6, num_beams=3, num_samples=2, length_penalty=0.8)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.8,
                      do_sample=False, pad_token_id=0)
    want = [[t for t in row[4:]] for row in ref.tolist()]
    want = [w[:w.index(2)] if 2 in w else w for w in want]
    assert got == want
    with pytest.raises(LMForgeError, match="beam search returns at most num_beams"):
        llm.generate(prompt, num_beams=2, num_samples=3)


def test_decoder_beam_search_ends_at_every_stop_id(tmp_path):
    """A chat model stops at EOS (0) and at <|im_end|> (3): a beam ends at either, as in
    transformers' beam search with eos_token_id=[0, 3], and the output excludes it."""
    import string

    from lmforge.infer.beam import beam_search_decoder
    from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                  eos_token_id=0, pad_token_id=1)
    hf = transformers.GPT2LMHeadModel(cfg)
    _randomize(hf, 2)
    with torch.no_grad():
        hf.transformer.wte.weight[3] *= 2.0  # <|im_end|> likely after a few tokens (the head is tied)
    hf.eval().save_pretrained(tmp_path)
    prompt = [5, 6, 7, 8]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                      pad_token_id=1, eos_token_id=[0, 3])
    assert [row[-1] for row in ref.tolist()] == [3, 3]  # both best beams ended at <|im_end|>
    want = [row[4:-1] for row in ref.tolist()]
    assert want == [[15, 22, 22], [22, 22, 22]]

    tok = Tokenizer.train_char([string.ascii_letters[:44]])  # 6 specials + 44 characters = the model's 50
    tok.chat_template = CHATML_TEMPLATE
    llm = LLM.load(tmp_path)
    llm.tokenizer = tok
    assert llm.stop_ids == {0, 3} and tok.vocab_size == 50
    assert llm.generate(prompt, max_new_tokens=8, num_beams=3, num_samples=2) == want
    got = beam_search_decoder(llm.model, [prompt], max_new_tokens=8, num_beams=3, num_return_sequences=2,
                              eos_id=[0, 3], pad_id=1)
    assert [g.ids for g in got[0]] == want and [g.finish_reason for g in got[0]] == ["eos", "eos"]
    # with EOS alone the same beams run on through <|im_end|>
    eos_only = beam_search_decoder(llm.model, [prompt], max_new_tokens=8, num_beams=3, eos_id=0, pad_id=1)
    assert eos_only[0].ids == hf.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, do_sample=False,
                                          pad_token_id=1, eos_token_id=0)[0, 4:].tolist()
    assert 3 in eos_only[0].ids


@pytest.mark.parametrize("make", [t5_folder, bart_folder])
def test_hf_folder_loads_onto_the_requested_device(tmp_path, make):
    """Weights assigned into the model are moved to the device first (the meta device stands in for CUDA)."""
    from lmforge.interop.hf import load_hf_dir

    make(tmp_path / "hf")
    model = load_hf_dir(tmp_path / "hf", device="meta")[0]
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
