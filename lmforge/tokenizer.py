"""Tokenizers: one `Tokenizer` type for every model family, stored as a `tokenizers` tokenizer.json.

`Tokenizer` is a thin wrapper around a `tokenizers.Tokenizer` (`.hf`) so that HF-imported
tokenizers (GPT-2, Llama, T5, BERT, ...) and the ones lmforge trains behave the same. It knows the
ids of its special tokens by role: eos / pad / bos for generation, and cls / sep / mask / unk for
encoders, whose `batch(texts, pairs)` adds them through the tokenizer's own post-processor
(BERT's `[CLS] a [SEP] b [SEP]`, RoBERTa's `<s> a </s></s> b </s>`) with token types.
lmforge-trained byte-level BPE and char vocabularies start with the special tokens, in this order
(so their ids are fixed):

    0 <|endoftext|>   end of document (EOS); `prepare` appends it after every document
    1 <|pad|>         padding for batched generation / fine-tuning
    2 <|im_start|>    reserved for chat templates
    3 <|im_end|>      reserved for chat templates
    4 <|mask|>        reserved for masked / diffusion objectives

lmforge-trained WordPiece vocabularies (`train_wordpiece`, for encoders) start with
`[PAD] [UNK] [CLS] [SEP] [MASK]` = 0..4, [SEP] also ending documents of prepared data.

`encode` never adds special tokens and, by default, treats text that merely *looks* like a special
token ("<|endoftext|>" inside a document) as ordinary text, so data can't inject control tokens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import LMForgeError

# ChatML, lmforge's own chat template; its markers are the reserved special tokens 2 and 3. With
# `tools` it is Hermes-style, as Qwen2.5's: the tool schemas in the system turn inside <tools>, the
# assistant's calls as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, tool results (role
# "tool") as <tool_response> blocks of one user turn. Without tools it renders plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first and tools %}"
    "{% elif message['role'] in ['system', 'user'] or (message['role'] == 'assistant' and not message.tool_calls) %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for call in message.tool_calls %}{% if call.function is defined %}{% set call = call.function %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\\\"name\\\": \\\"' + call.name + '\\\", \\\"arguments\\\": ' + call.arguments | tojson + '}\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROLES = ("bos", "eos", "pad", "cls", "sep", "mask", "unk")
# Role names of the vocabularies lmforge recognises when no tokenizer_config.json names them.
_BERT_ROLES = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]", "eos": "[SEP]"}
_ROBERTA_ROLES = {"cls": "<s>", "sep": "</s>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>", "eos": "</s>"}
_LMFORGE_ROLES = {"eos": EOS_TOKEN, "pad": PAD_TOKEN}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens by role (`eos_id`, `pad_id`, `cls_id`, ...:
    None when the vocabulary lacks them), an optional chat template and a default `max_length`
    for encoder batches."""

    def __init__(self, hf: tokenizers.Tokenizer, eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN,
                 chat_template: str | None = None, bos_token: str | None = None,
                 extra_stop_ids: Iterable[int] = (), *, cls_token: str | None = None, sep_token: str | None = None,
                 mask_token: str | None = None, unk_token: str | None = None, max_length: int | None = None):
        self.hf = hf
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.cls_token, self.sep_token, self.mask_token, self.unk_token = cls_token, sep_token, mask_token, unk_token
        self.eos_id: int | None = hf.token_to_id(eos_token) if eos_token is not None else None
        self.pad_id: int | None = hf.token_to_id(pad_token) if pad_token is not None else None
        self.max_length = max_length
        self.chat_template = chat_template
        self._extra_stop_ids = set(int(i) for i in extra_stop_ids)

    def _id(self, name: str | None) -> int | None:
        return self.hf.token_to_id(name) if name is not None else None

    @property
    def cls_id(self) -> int | None:
        return self._id(self.cls_token)

    @property
    def sep_id(self) -> int | None:
        return self._id(self.sep_token)

    @property
    def mask_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_ids(self) -> list[int]:
        """Ids of every role token and every token the vocabulary marks special."""
        roles = {self._id(getattr(self, f"{r}_token")) for r in ROLES}
        added = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        return sorted(i for i in roles | added if i is not None)

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
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True,
                        progress: bool = False) -> Tokenizer:
        """A BERT-style WordPiece tokenizer (uncased by default) for encoders: `[PAD] [UNK] [CLS] [SEP]
        [MASK]` are ids 0..4, a post-processor adds `[CLS] a [SEP] (b [SEP])`, and [SEP] is also the
        EOS that separates documents in prepared data (as in BERT's pretraining data)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 64:
            raise LMForgeError(f"vocab_size must be an integer of at least 64 for WordPiece, got {vocab_size!r}")
        hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(WORDPIECE_SPECIALS),
                                            show_progress=progress)
        hf.train_from_iterator(_nonempty(texts), trainer=trainer)
        cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return cls.with_roles(hf, encoder=True)

    @classmethod
    def with_roles(cls, hf: tokenizers.Tokenizer, names: dict[str, str | None] | None = None,
                   max_length: int | None = None, encoder: bool = False) -> Tokenizer:
        """A Tokenizer whose role tokens are `names` (role -> token text) where given, else the
        vocabulary's own: for an encoder BERT's `[CLS] [SEP] [MASK] [PAD] [UNK]` (EOS = [SEP]) or
        RoBERTa's `<s> </s> <mask> <pad> <unk>` (EOS = </s>); otherwise lmforge's `<|endoftext|>` and
        `<|pad|>`. Encoders need cls, sep and pad tokens."""
        vocab = hf.get_vocab(with_added_tokens=True)
        default = (_BERT_ROLES if "[CLS]" in vocab else _ROBERTA_ROLES) if encoder else _LMFORGE_ROLES
        roles = {r: (names or {}).get(r) or default.get(r) for r in ROLES}
        if encoder:
            for role in ("cls", "sep", "pad"):
                if roles[role] not in vocab:
                    raise LMForgeError(f"the tokenizer has no {role} token '{roles[role]}'")
        roles = {r: n if n is not None and n in vocab else None for r, n in roles.items()}
        return cls(hf, eos_token=roles["eos"], pad_token=roles["pad"], bos_token=roles["bos"], cls_token=roles["cls"],
                   sep_token=roles["sep"], mask_token=roles["mask"], unk_token=roles["unk"], max_length=max_length)

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN) -> Tokenizer:
        """The tokenizer.json at `path` alone, with the given EOS / pad names (a prepared data directory's)."""
        return cls(read_tokenizer_json(path), eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def load(cls, path: str | Path, max_length: int | None = None, encoder: bool = False) -> Tokenizer:
        """The tokenizer of a model folder: tokenizer.json at `path`, its special tokens named by the
        `tokenizer_config.json` beside it where it names them (Hugging Face folders do, e.g. Llama's
        `</s>`), else by the vocabulary (`with_roles`); `max_length` defaults to the config's
        `model_max_length`; the chat template and generation_config's stop ids come along
        (`attach_chat_settings`)."""
        path = Path(path)
        hf = read_tokenizer_json(path)
        conf = read_json_object(path.with_name("tokenizer_config.json"))
        names = {r: token_name(conf.get(f"{r}_token")) for r in ROLES}
        model_max = conf.get("model_max_length")
        if max_length is None and isinstance(model_max, int) and model_max < 10**6:  # HF's "unlimited" is 1e30
            max_length = model_max
        tok = cls.with_roles(hf, names, max_length, encoder)
        tok.attach_chat_settings(path.parent, conf)
        return tok

    def attach_chat_settings(self, directory: str | Path, conf: dict[str, Any] | None = None) -> None:
        """Read a model folder's chat settings: the chat template (chat_template.jinja, else
        tokenizer_config.json's chat_template), the BOS token name, and generation_config.json's
        eos_token_id list (all of which end generation, as in transformers). `conf`: the folder's
        tokenizer_config.json when the caller has read it already."""
        directory = Path(directory)
        if conf is None:
            conf = read_json_object(directory / "tokenizer_config.json")
        self.bos_token = token_name(conf.get("bos_token"))
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
                    template: str | None = None, tools: list[Any] | None = None, **kwargs: Any) -> str:
        """The conversation as text, rendered by the Jinja chat template as transformers renders it
        (sandboxed environment, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`; `tools` as
        JSON schemas or functions, `tool_schemas`; keys whose value is None left out of messages).
        A tool call's arguments given as a JSON string (OpenAI's format) reach the template as an
        object, which is what templates render."""
        from lmforge.chat_template import render
        from lmforge.tools import tool_schemas

        template = template or self.chat_template
        if not template:
            raise LMForgeError("this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                               "and no chat_template.jinja)")
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                    "pad_token": self.pad_token or ""}
        return render(template, messages=[_template_message(m) for m in messages],
                      add_generation_prompt=add_generation_prompt, tools=tool_schemas(tools),
                      **{"documents": None, **specials, **kwargs})

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, template: str | None = None, tools: list[Any] | None = None,
                            **kwargs: Any) -> Any:
        """Token ids (or, with tokenize=False, the text) of a conversation, equal to transformers'
        `tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=...)`."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, template=template,
                                tools=tools, **kwargs)
        if not tokenize:
            return text
        self.hf.encode_special_tokens = False  # the template's markers are special tokens
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered chat text (specials parsed, nothing added) and each token's character span."""
        self.hf.encode_special_tokens = False
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def tokenizer_config(self, model_max_length: int | None = None) -> dict[str, Any]:
        """A transformers-style tokenizer_config.json for this tokenizer (PreTrainedTokenizerFast):
        its role tokens (encoders: cls / sep / mask / pad / unk; others: bos / eos / pad), the chat
        template and `model_max_length` when given."""
        conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        roles = ("cls", "sep", "mask", "pad", "unk") if self.cls_token is not None else ("bos", "eos", "pad")
        for role in roles:
            name = getattr(self, f"{role}_token")
            if name is not None and self.hf.token_to_id(name) is not None:
                conf[f"{role}_token"] = name
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        if model_max_length:
            conf["model_max_length"] = model_max_length
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

    # ---- encoder batches ---------------------------------------------------------------------

    def encode_pairs(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None,
                     max_length: int | None = None) -> tuple[list[list[int]], list[list[int]], int]:
        """(ids, token types, number truncated): each row framed by the tokenizer's own template
        (`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`), cut to max_length (longest-first) so the
        specials always fit."""
        limit = max_length or self.max_length
        if pairs is not None and len(pairs) != len(texts):
            raise LMForgeError(f"{len(texts)} texts but {len(pairs)} text pairs")
        inputs: list[Any] = list(texts) if pairs is None else [t if p is None else (t, p) for t, p in zip(texts, pairs)]
        if limit:
            self.hf.enable_truncation(limit, strategy="longest_first")
        else:
            self.hf.no_truncation()
        self.hf.no_padding()
        self.hf.encode_special_tokens = False
        try:
            encs = self.hf.encode_batch(inputs, add_special_tokens=True)
        finally:
            self.hf.no_truncation()
        n_cut = sum(1 for e in encs if e.overflowing)
        return [e.ids for e in encs], [e.type_ids for e in encs], n_cut

    def batch(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None,
              max_length: int | None = None, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
        """Right-padded tensors for an encoder: input_ids, attention_mask (bool), token_type_ids; plus
        `truncated` (count). pad_to_multiple_of rounds the width up (fewer distinct shapes; never past
        max_length)."""
        import torch

        if self.pad_id is None:
            raise LMForgeError("the tokenizer has no padding token, so it cannot make batches")
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

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf.model).__name__}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _template_message(message: Any) -> Any:
    """A message as chat templates expect it: no None values; tool-call arguments as objects."""
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_parsed_arguments(c) for c in calls]
    return out


def _parsed_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            return call  # rendered as it is
        return {**call, "function": {**fn, "arguments": args}}
    return call


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def read_tokenizer_json(path: str | Path) -> tokenizers.Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"tokenizer file not found: {path}")
    try:
        return tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON / schema
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LMForgeError(f"{path} is not a valid tokenizer.json ({first})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file beside a tokenizer ({} when absent; a clear error when unreadable)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LMForgeError(f"{path} is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def token_name(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None
