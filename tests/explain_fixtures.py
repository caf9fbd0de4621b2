"""Tiny random models of every family with real tokenizers, for the explanation and report tests."""

from __future__ import annotations

import torch

from lmforge.infer.llm import LLM
from lmforge.tokenizer import Tokenizer

CORPUS = ["the king and queen of a far land rode out to see what the night would bring",
          "a wonderful moving film with a dull and far too long plot",
          "while wind and rain fell on old stone walls every lord spoke of love war and death"] * 4


def decoder_llm(seed: int = 0, pos_encoding: str = "learned") -> LLM:
    from lmforge.models.decoder import Decoder, config_from_preset

    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(seed)
    cfg = config_from_preset("tiny", vocab_size=tok.vocab_size, pos_encoding=pos_encoding, init_std=0.2)
    return LLM(Decoder(cfg).eval(), cfg, tok)


def decoder_classifier_llm(seed: int = 0) -> LLM:
    from lmforge.models.heads import DecoderClassifier, classifier_from_preset

    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(seed)
    cfg = classifier_from_preset("tiny", vocab_size=tok.vocab_size, num_labels=2, id2label={"0": "neg", "1": "pos"},
                                 init_std=0.2)
    return LLM(DecoderClassifier(cfg).eval(), cfg, tok)


def encoder_llm(head: str = "sequence", seed: int = 0) -> LLM:
    from lmforge.models.encoder import Encoder, config_from_preset

    tok = Tokenizer.train_wordpiece(CORPUS, vocab_size=100)
    torch.manual_seed(seed)
    extra = {"labels": ["negative", "positive"], "num_labels": 2} if head == "sequence" else {}
    cfg = config_from_preset("encoder-tiny", vocab_size=tok.vocab_size, head=head, **extra)
    return LLM(Encoder(cfg).eval(), cfg, tok)


def seq2seq_llm(arch: str = "t5", seed: int = 0) -> LLM:
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset

    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(seed)
    cfg = config_from_preset(f"{arch}-tiny", vocab_size=tok.vocab_size)
    return LLM(Seq2Seq(cfg).eval(), cfg, tok)
