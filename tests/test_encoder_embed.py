"""Sentence embeddings: LLM.embed equals sentence-transformers on a sentence-transformers folder
(its own pooling and normalisation), and the pooling / normalize options behave."""

import json

import pytest
import torch

from lmforge.tokenizer import Tokenizer
from reference_libs import reference_lib

TEXTS = ["the cat sat on the mat", "a dog", "green happy movie and a long plot " * 12, "x"]


def hf_bert_folder(tmp_path, tf):
    tok = Tokenizer.train_wordpiece(["the cat sat on the mat", "a dog ran to the house", "green happy movie plot"] * 20,
                                 vocab_size=80)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    tf.BertModel(cfg).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(tok.tokenizer_config(64)))
    return tmp_path / "hf"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_sentence_transformers_folder_matches(tmp_path, pooling, normalize):
    tf = reference_lib("transformers")
    st = reference_lib("sentence_transformers")
    from sentence_transformers import models  # noqa: F401  (st.models, also in sentence-transformers 6)
    from lmforge import LLM
    from lmforge.interop.hf import convert_from_hf

    hf = hf_bert_folder(tmp_path, tf)
    body = st.models.Transformer(str(hf), max_seq_length=24)
    mods = [body, st.models.Pooling(32, pooling_mode=pooling)]
    if normalize:
        mods.append(st.models.Normalize())
    model = st.SentenceTransformer(modules=mods, device="cpu")
    model.save(str(tmp_path / "st"))
    ref = model.encode(TEXTS, convert_to_tensor=True)
    llm = LLM.load(tmp_path / "st")
    assert llm.model.sentence_pooling == {"pooling": pooling, "normalize": normalize, "max_seq_length": 24}
    got = llm.embed(TEXTS)
    assert got.shape == (4, 32)
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)
    # converted to an lmforge model directory, the pooling settings travel with it
    convert_from_hf(str(tmp_path / "st"), str(tmp_path / "lm"))
    torch.testing.assert_close(LLM.load(tmp_path / "lm").embed(TEXTS), ref.float(), atol=1e-5, rtol=0)


def test_embed_pooling_and_normalize_options(tmp_path):
    tf = reference_lib("transformers")
    from lmforge import LLM
    from lmforge.errors import LMForgeError

    hf = hf_bert_folder(tmp_path, tf)
    llm = LLM.load(hf)  # a plain BertModel folder: mean pooling, normalised by default
    ref = tf.BertModel.from_pretrained(hf).eval()
    b = llm.tokenizer.batch(TEXTS[:2])
    with torch.no_grad():
        h = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).last_hidden_state
    m = b["attention_mask"][..., None].float()
    mean = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(llm.embed(TEXTS[:2], normalize=False), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(llm.embed(TEXTS[:2]), torch.nn.functional.normalize(mean, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(llm.embed(TEXTS[:2], pooling="cls", normalize=False), h[:, 0], atol=1e-5, rtol=0)
    assert llm.embed(TEXTS).norm(dim=-1).sub(1).abs().max() < 1e-5
    # batching does not change an embedding
    torch.testing.assert_close(llm.embed(TEXTS, batch_size=1), llm.embed(TEXTS), atol=1e-5, rtol=0)
    with pytest.raises(LMForgeError, match="pooling must be 'mean' or 'cls'"):
        llm.embed(TEXTS, pooling="max")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_classify_from_sentence_transformers_folder_reads_its_pooling(tmp_path):
    """`finetune classify` on a sentence-transformers folder puts the head on the folder's pooling
    (mean), not on BERT's pooler; --model.pooling still overrides."""
    tf = reference_lib("transformers")
    st = reference_lib("sentence_transformers")
    from lmforge import LLM
    from lmforge.cli import main

    hf = hf_bert_folder(tmp_path, tf)
    model = st.SentenceTransformer(modules=[st.models.Transformer(str(hf), max_seq_length=24),
                                            st.models.Pooling(32, pooling_mode="mean")], device="cpu")
    model.save(str(tmp_path / "st"))
    rows = [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(TEXTS * 4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra, want in (([], "mean"), (["--model.pooling", "cls"], "cls")):
        out = tmp_path / f"run-{want}"
        assert main(["finetune", "classify", "--base", str(tmp_path / "st"), "--data", str(data), "--out", str(out),
                     "--train.max_steps", "2", "--train.micro_batch_size", "4", "--train.progress", "false", *extra]) == 0
        assert LLM.load(out).model.cfg.classifier_pooling == want
