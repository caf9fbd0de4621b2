"""Encoder tokenizers: WordPiece training and [CLS] a [SEP] b [SEP] encoding with token types.

`EncoderTokenizer` wraps a `tokenizers.Tokenizer` that has a post-processor adding the special
tokens (BERT's TemplateProcessing, RoBERTa's `<s> a </s></s> b </s>`), so Hugging Face
tokenizer.json files load as they are and behave as in transformers. lmforge's own WordPiece
vocabularies start with the specials at fixed ids:

    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP] (also the document separator of prepared data)   4 [MASK]

(lmforge/tokenizer.py stays the decoder's byte-level BPE; `as_lm_tokenizer()` gives the same vocab
wrapped as an lmforge `Tokenizer` with [SEP] as its EOS, which `lmforge prepare` uses.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import LMForgeError

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ROLES = ("cls", "sep", "mask", "pad", "unk")
_BERT_NAMES = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
_ROBERTA_NAMES = {"cls": "<s>", "sep": "</s>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>"}


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True, progress: bool = False) -> tokenizers.Tokenizer:
    """A BERT-style WordPiece `tokenizers.Tokenizer` (uncased by default) with the specials first."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 64:
        raise LMForgeError(f"vocab_size must be an integer of at least 64 for WordPiece, got {vocab_size!r}")
    hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS),
                                        show_progress=progress)
    hf.train_from_iterator((t for t in texts if t), trainer=trainer)
    cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return hf


class EncoderTokenizer:
    """Tokenizer for encoders: `batch(texts, pairs)` -> padded ids, attention mask and token types."""

    def __init__(self, hf: tokenizers.Tokenizer, names: Optional[dict[str, str]] = None, max_length: Optional[int] = None):
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        default = _ROBERTA_NAMES if "<s>" in vocab and "[CLS]" not in vocab else _BERT_NAMES
        self.names = {r: (names or {}).get(r) or default[r] for r in _ROLES}
        for role in ("cls", "sep", "pad"):
            if self.names[role] not in vocab:
                raise LMForgeError(f"the tokenizer has no {role} token '{self.names[role]}'")
        self.cls_id, self.sep_id, self.pad_id = (vocab[self.names[r]] for r in ("cls", "sep", "pad"))
        self.mask_id: Optional[int] = vocab.get(self.names["mask"])
        self.unk_id: Optional[int] = vocab.get(self.names["unk"])
        self.special_ids = sorted({i for t, i in vocab.items() if t in self.names.values()} |
                                  {i for i, t in hf.get_added_tokens_decoder().items() if t.special})
        self.max_length = max_length

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> "EncoderTokenizer":
        return cls(train_wordpiece(texts, vocab_size, lowercase))

    @classmethod
    def from_file(cls, path: str | Path, max_length: Optional[int] = None) -> "EncoderTokenizer":
        """A tokenizer.json (lmforge's or a Hugging Face BERT / RoBERTa one, as is); special-token
        names come from a tokenizer_config.json beside it when there is one."""
        path = Path(path)
        if not path.is_file():
            raise LMForgeError(f"tokenizer file not found: {path}")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise LMForgeError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None
        names: dict[str, str] = {}
        side = path.with_name("tokenizer_config.json")
        if side.is_file():
            try:
                conf = json.loads(side.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise LMForgeError(f"{side} is not valid JSON") from None
            for role in _ROLES:
                v = conf.get(f"{role}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    names[role] = v
            if max_length is None and isinstance(conf.get("model_max_length"), int) and conf["model_max_length"] < 10**6:
                max_length = conf["model_max_length"]
        return cls(hf, names, max_length)

    def save(self, path: str | Path) -> None:
        from lmforge.checkpoint import atomic_write_text

        atomic_write_text(path, self.hf.to_str(pretty=True))

    def hf_tokenizer_config(self, model_max_length: Optional[int] = None) -> dict[str, Any]:
        """tokenizer_config.json for transformers' PreTrainedTokenizerFast (exported folders)."""
        conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        conf.update({f"{r}_token": n for r, n in self.names.items() if self.hf.token_to_id(n) is not None})
        if model_max_length:
            conf["model_max_length"] = model_max_length
        return conf

    def as_lm_tokenizer(self) -> Any:
        """The same vocabulary as an lmforge `Tokenizer` ([SEP] ends documents, [PAD] pads)."""
        from lmforge.tokenizer import Tokenizer

        return Tokenizer(self.hf, eos_token=self.names["sep"], pad_token=self.names["pad"])

    # ---- use ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def encode_pairs(self, texts: Sequence[str], pairs: Optional[Sequence[Optional[str]]] = None,
                     max_length: Optional[int] = None) -> tuple[list[list[int]], list[list[int]], int]:
        """(ids, token types, number truncated): each row `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` (the
        tokenizer's own template), cut to max_length (longest-first) so the specials always fit."""
        limit = max_length or self.max_length
        inputs: list[Any] = list(texts) if pairs is None else [t if p is None else (t, p) for t, p in zip(texts, pairs)]
        if pairs is not None and len(pairs) != len(texts):
            raise LMForgeError(f"{len(texts)} texts but {len(pairs)} text pairs")
        if limit:
            self.hf.enable_truncation(limit, strategy="longest_first")
        else:
            self.hf.no_truncation()
        self.hf.no_padding()
        try:
            encs = self.hf.encode_batch(inputs, add_special_tokens=True)
        finally:
            self.hf.no_truncation()
        n_cut = sum(1 for e in encs if e.overflowing)
        return [e.ids for e in encs], [e.type_ids for e in encs], n_cut

    def batch(self, texts: Sequence[str], pairs: Optional[Sequence[Optional[str]]] = None,
              max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None) -> dict[str, Any]:
        """Right-padded tensors: input_ids, attention_mask (bool), token_type_ids; plus `truncated` (count).
        pad_to_multiple_of rounds the width up (fewer distinct shapes; never past max_length)."""
        import torch

        ids, types, n_cut = self.encode_pairs(texts, pairs, max_length)
        T = max((len(r) for r in ids), default=1)
        if pad_to_multiple_of:
            T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
            limit = max_length or self.max_length
            T = min(T, limit) if limit else T
        idx = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        tt = torch.zeros((len(ids), T), dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.bool)
        for i, (r, t) in enumerate(zip(ids, types)):
            idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            tt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, :len(r)] = True
        return {"input_ids": idx, "attention_mask": mask, "token_type_ids": tt, "truncated": n_cut}

    def __repr__(self) -> str:
        return (f"EncoderTokenizer({type(self.hf.model).__name__}, vocab_size={self.vocab_size}, "
                f"cls={self.names['cls']}, sep={self.names['sep']}, mask={self.names['mask']})")
