"""Tokenizers: byte-level BPE or one-token-per-character, both stored as a `tokenizers` tokenizer.json.

`Tokenizer` is a thin wrapper around a `tokenizers.Tokenizer` (`.hf`) so that HF-imported
tokenizers (GPT-2, Llama, ...) and the ones lmforge trains behave the same. lmforge-trained
vocabularies start with the special tokens, in this order (so their ids are fixed):

    0 <|endoftext|>   end of document (EOS); `prepare` appends it after every document
    1 <|pad|>         padding for batched generation / fine-tuning
    2 <|im_start|>    reserved for chat templates
    3 <|im_end|>      reserved for chat templates
    4 <|mask|>        reserved for masked / diffusion objectives

`encode` never adds special tokens and, by default, treats text that merely *looks* like a special
token ("<|endoftext|>" inside a document) as ordinary text, so data can't inject control tokens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import LMForgeError

# ChatML, lmforge's own chat template; its markers are the reserved special tokens 2 and 3.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Tokens that end an assistant turn in common templates (ChatML, Llama-3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"]
CHAT_TEMPLATE_FILE = "chat_template.jinja"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<|mask|>"]
UNK_TOKEN = "<|unk|>"  # char tokenizer only: characters not seen in training
N_BYTES = 256
MIN_BPE_VOCAB = N_BYTES + len(SPECIAL_TOKENS)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its EOS and pad tokens (None when the vocab lacks them)."""

    def __init__(self, hf: tokenizers.Tokenizer, eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN,
                 chat_template: str | None = None, bos_token: str | None = None,
                 extra_stop_ids: Iterable[int] = ()):
        self.hf = hf
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.eos_id: int | None = hf.token_to_id(eos_token) if eos_token is not None else None
        self.pad_id: int | None = hf.token_to_id(pad_token) if pad_token is not None else None
        self.chat_template = chat_template
        self._extra_stop_ids = set(int(i) for i in extra_stop_ids)
        self._compiled: Any = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
        """Byte-level BPE (GPT-2 pre-tokenization) with exactly `vocab_size` tokens, specials included.

        `texts` is consumed once, as a stream (memory is bounded by the number of distinct words,
        not the corpus size). If the text is too small to learn enough merges, the vocabulary is
        padded with `<|reserved_N|>` special tokens so the model's embedding size is what was asked.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise LMForgeError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < MIN_BPE_VOCAB:
            raise LMForgeError(
                f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer; the minimum is "
                f"{MIN_BPE_VOCAB} ({N_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        hf = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False keeps decode(encode(s)) == s exactly.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=progress,
        )
        hf.train_from_iterator(_nonempty(texts), trainer=trainer)
        have = hf.get_vocab_size(with_added_tokens=True)
        if have < vocab_size:
            warnings.warn(
                f"the training text supports only {have} BPE tokens; padding the vocabulary to {vocab_size} "
                f"with {vocab_size - have} unused <|reserved_N|> tokens",
                stacklevel=2,
            )
            hf.add_special_tokens([tokenizers.AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                                   for i in range(vocab_size - have)])
        assert hf.get_vocab_size(with_added_tokens=True) == vocab_size
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per distinct character seen (sorted by code point) after the specials and `<|unk|>`."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, UNK_TOKEN, *sorted(seen)])}
        # A BPE model with no merges maps each character to its id; no pre-tokenizer is needed.
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
        hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        hf.decoder = decoders.Fuse()  # concatenate characters (the default decoder joins with spaces)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise LMForgeError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON / schema
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LMForgeError(f"{path} is not a valid tokenizer.json ({first})") from None
        return cls(hf, eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def from_model_dir_file(cls, path: str | Path) -> Tokenizer:
        """`from_file`, taking the EOS / pad token names from a `tokenizer_config.json` beside it
        (Hugging Face folders name them there, e.g. Llama's `</s>`)."""
        path = Path(path)
        side = path.with_name("tokenizer_config.json")
        eos, pad = EOS_TOKEN, PAD_TOKEN
        if side.is_file():
            try:
                conf = json.loads(side.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LMForgeError(f"{side} is not valid JSON") from None

            def name(v: Any) -> str | None:
                return v.get("content") if isinstance(v, dict) else v

            eos = name(conf.get("eos_token")) or EOS_TOKEN
            pad = name(conf.get("pad_token")) or PAD_TOKEN
        tok = cls.from_file(path, eos_token=eos, pad_token=pad)
        tok.attach_chat_settings(path.parent)
        return tok

    def attach_chat_settings(self, directory: str | Path) -> None:
        """Read a model folder's chat settings: the chat template (chat_template.jinja, else
        tokenizer_config.json's chat_template), the BOS token name, and generation_config.json's
        eos_token_id list (all of which end generation, as in transformers)."""
        directory = Path(directory)
        conf: dict[str, Any] = {}
        side = directory / "tokenizer_config.json"
        if side.is_file():
            try:
                conf = json.loads(side.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LMForgeError(f"{side} is not valid JSON") from None
            conf = conf if isinstance(conf, dict) else {}
        bos = conf.get("bos_token")
        self.bos_token = bos.get("content") if isinstance(bos, dict) else bos
        template = conf.get("chat_template")
        if isinstance(template, list):  # several named templates (transformers' format): take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():  # transformers >= 4.43 saves it here and prefers it
            template = jinja_file.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) and template.strip() else None
        stop: list[int] = []
        gen = directory / "generation_config.json"
        if gen.is_file():
            try:
                eos_ids = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                eos_ids = None
            stop = [eos_ids] if isinstance(eos_ids, int) else [i for i in (eos_ids or []) if isinstance(i, int)]
        self._extra_stop_ids = set(stop)

    # ---- chat ----------------------------------------------------------------------------------

    @property
    def end_of_turn_id(self) -> int | None:
        """The token that closes an assistant turn in this tokenizer's chat template (None without one)."""
        if not self.chat_template:
            return None
        for name in END_OF_TURN_TOKENS:
            if name in self.chat_template and self.hf.token_to_id(name) is not None:
                return self.hf.token_to_id(name)
        return self.eos_id

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation: EOS, the end-of-turn token, generation_config's eos ids."""
        ids = set(self._extra_stop_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        if self.end_of_turn_id is not None:
            ids.add(self.end_of_turn_id)
        return ids

    def has_chat_tokens(self) -> bool:
        return all(self.hf.token_to_id(t) is not None for t in CHAT_TOKENS)

    def add_chat_tokens(self) -> list[str]:
        """Add the ChatML markers as special tokens when missing (ids appended at the end of the
        vocabulary); returns the tokens added. The model's embedding must grow to `vocab_size`."""
        missing = [t for t in CHAT_TOKENS if self.hf.token_to_id(t) is None]
        if missing:
            self.hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        return missing

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    template: str | None = None, **kwargs: Any) -> str:
        """The conversation as text, rendered by the Jinja chat template as transformers renders it
        (sandboxed environment, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`)."""
        from lmforge.chat_template import render

        template = template or self.chat_template
        if not template:
            raise LMForgeError("this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                               "and no chat_template.jinja)")
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                    "pad_token": self.pad_token or ""}
        return render(template, messages=messages, add_generation_prompt=add_generation_prompt,
                      **{**specials, **kwargs})

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, template: str | None = None, **kwargs: Any) -> Any:
        """Token ids (or, with tokenize=False, the text) of a conversation, equal to transformers'
        `tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=...)`."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, template=template, **kwargs)
        if not tokenize:
            return text
        self.hf.encode_special_tokens = False  # the template's markers are special tokens
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered chat text (specials parsed, nothing added) and each token's character span."""
        self.hf.encode_special_tokens = False
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def tokenizer_config(self) -> dict[str, Any]:
        """A transformers-style tokenizer_config.json for this tokenizer (chat template included)."""
        conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, name in (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("pad_token", self.pad_token)):
            if name is not None and self.hf.token_to_id(name) is not None:
                conf[key] = name
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        return conf

    def save(self, path: str | Path) -> None:
        from lmforge.checkpoint import atomic_write_text  # lazy: checkpoint imports torch

        self.hf.encode_special_tokens = False  # never persist the per-call setting used by encode()
        atomic_write_text(path, self.hf.to_str(pretty=True))

    # ---- use ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. allow_special=True parses "<|im_start|>" etc. as specials."""
        # A flag on the shared Rust object: don't call encode with different allow_special from threads.
        self.hf.encode_special_tokens = not allow_special
        return self.hf.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as Hugging Face tokenizers make them: special-token text is parsed
        as specials and the tokenizer's own template (e.g. a Llama BOS) is applied."""
        self.hf.encode_special_tokens = False
        return self.hf.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads in Rust (TOKENIZERS_PARALLELISM=false turns that off)."""
        self.hf.encode_special_tokens = not allow_special
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf.model).__name__}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t
