"""Constrained decoding: JSON Schema, regular expressions and choice lists as token masks.

    Grammar.from_options(tokenizer, vocab, response_format=..., guided_regex=...)  (compiled once, shared)
        .matcher(stop_ids)  ->  TokenConstraint  (one per generated row: its own parser state)
    each step:  constraint.allowed_V()  ->  logits of illegal tokens set to -inf  ->  sampling as usual
                constraint.accept(token)

The grammar engine is llguidance (Microsoft's, the one vLLM, SGLang and llama.cpp ship): it was
picked by measurement (benchmarks/structured.py, docs/structured.md) for correct masks (it honours
numeric bounds, lengths and patterns that outlines-core and lm-format-enforcer ignore), ~0.1 ms a
mask on a 50k vocabulary, ~1 ms to compile a schema, and no dependencies of its own.

The engine sees the vocabulary as bytes (`token_bytes`), built from the lmforge tokenizer itself:
byte-level BPE through GPT-2's byte table, SentencePiece-style `▁` and `<0xNN>` pieces, WordPiece
`##` continuations, plain character vocabularies. Special tokens are never allowed by the grammar;
the row's stop ids (EOS, end of turn) are allowed exactly when the grammar accepts what was generated.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any, Sequence

import torch

from lmforge.errors import LMForgeError

OPTIONS = ("response_format", "guided_json", "guided_regex", "guided_choice")
# Compact JSON (no free whitespace between tokens): a model cannot wander off into endless spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(LMForgeError):
    """A constraint that cannot be compiled; `field` names the option at fault (the server's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n_printable = list(bs), len(bs)
    for b in range(256):
        if b not in bs:  # unprintable bytes take the characters from 256 on, in byte order
            cs.append(256 + len(bs) - n_printable)
            bs.append(b)
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kinds(hf: Any) -> set[str]:
    """The types of a `tokenizers` decoder, Sequence flattened ("ByteLevel", "WordPiece", "Metaspace", ...)."""
    kinds: set[str] = set()
    stack = [json.loads(hf.to_str()).get("decoder")]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type", ""))
            stack.extend(d.get("decoders") or [])
    return kinds


def token_bytes(tokenizer: Any, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """(the bytes each token id stands for, the special ids) for a model with `vocab_size` logits;
    ids the tokenizer lacks (a padded embedding) count as special, so they are never allowed."""
    hf = tokenizer.hf
    kinds = _decoder_kinds(hf)
    special = set(tokenizer.special_ids)
    tokens: list[bytes] = []
    for i in range(vocab_size):
        s = hf.id_to_token(i)
        if s is None or i in special:
            special.add(i)
            tokens.append(b"<special_%d>" % i)
        elif "ByteLevel" in kinds:
            tokens.append(bytes(_BYTE_OF[c] for c in s))
        elif "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(s):
            tokens.append(bytes([int(s[3:5], 16)]))
        elif "WordPiece" in kinds:  # a continuation glues on, a word starts after a space
            tokens.append(s[2:].encode() if s.startswith("##") else b" " + s.encode())
        else:
            tokens.append(s.replace("\u2581", " ").encode() if kinds & {"Metaspace", "Replace"} else s.encode())
    return tokens, sorted(special)


class _VocabView:
    """What llguidance's `TokenizerWrapper` reads: token bytes, special ids, EOS and an encoder."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokens, self.special_token_ids = token_bytes(tokenizer, vocab_size)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else self.special_token_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self._tok = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text)


_ENGINE_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()


def engine_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer` (built once per tokenizer and vocabulary size: ~0.2 s at 50k)."""
    import llguidance

    per_size = _ENGINE_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in per_size:
        view = _VocabView(tokenizer, vocab_size)
        per_size[vocab_size] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=vocab_size)
    return per_size[vocab_size]


def _json_schema_of(response_format: Any) -> dict[str, Any] | None:
    """The JSON Schema an OpenAI `response_format` asks for (None for {"type": "text"})."""
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise GrammarError("response_format must be an object with a 'type': 'text', 'json_object' or "
                           "'json_schema'", "response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format json_schema must be an object {'name': ..., 'schema': {...}, "
                               "'strict': true}", "response_format")
        return spec.get("schema", {})
    raise GrammarError(f"response_format type '{kind}' is not supported; use 'text', 'json_object' or 'json_schema'",
                       "response_format")


def grammar_source(response_format: Any = None, guided_json: Any = None, guided_regex: str | None = None,
                   guided_choice: Sequence[str] | None = None) -> tuple[str, str] | None:
    """(llguidance grammar, the option it came from) for at most one of the options; None: no constraint."""
    import llguidance

    given = [name for name, v in zip(OPTIONS, (response_format, guided_json, guided_regex, guided_choice))
             if v is not None]
    if len(given) > 1:
        raise GrammarError(f"give at most one of {', '.join(OPTIONS)}; got {' and '.join(given)}", given[1])
    if response_format is not None:
        schema = _json_schema_of(response_format)
        if schema is None:
            return None
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS), "response_format"
    if guided_json is not None:
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except json.JSONDecodeError as e:
                raise GrammarError(f"guided_json is not valid JSON: {e}", "guided_json") from None
        if not isinstance(guided_json, dict):
            raise GrammarError("guided_json must be a JSON Schema object", "guided_json")
        return llguidance.LLMatcher.grammar_from_json_schema(guided_json, defaults=_JSON_OPTIONS), "guided_json"
    if guided_regex is not None:
        if not isinstance(guided_regex, str):
            raise GrammarError("guided_regex must be a string", "guided_regex")
        return llguidance.LLMatcher.grammar_from_regex(guided_regex), "guided_regex"
    if guided_choice is not None:
        if isinstance(guided_choice, str) or not guided_choice or not all(isinstance(c, str) for c in guided_choice):
            raise GrammarError("guided_choice must be a non-empty list of strings", "guided_choice")
        # Lark string literals; JSON's escaping is a subset of theirs.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in guided_choice)), "guided_choice"
    return None


class Grammar:
    """A compiled constraint for one tokenizer and vocabulary; make a `matcher` per generated row."""

    def __init__(self, tokenizer: Any, vocab_size: int, source: str, field: str):
        import llguidance

        self.vocab_size = vocab_size
        self.field = field
        self._engine_tok = engine_tokenizer(tokenizer, vocab_size)
        self._source = source
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self._engine_tok)
        if is_error:
            raise GrammarError(f"{field} cannot be compiled into a grammar: {messages[0].strip()}", field)

    @classmethod
    def from_options(cls, tokenizer: Any, vocab_size: int, response_format: Any = None, guided_json: Any = None,
                     guided_regex: str | None = None, guided_choice: Sequence[str] | None = None) -> "Grammar | None":
        """The grammar of whichever option is given (see `grammar_source`), None when none is."""
        found = grammar_source(response_format, guided_json, guided_regex, guided_choice)
        if found is None:
            return None
        if tokenizer is None:
            raise GrammarError(f"{found[1]} needs a tokenizer, and this model has none", found[1])
        return cls(tokenizer, vocab_size, *found)

    def matcher(self, stop_ids: Sequence[int]) -> "TokenConstraint":
        if not stop_ids:
            raise GrammarError(f"{self.field} needs a stop token (EOS) to end a row once the grammar is complete",
                               self.field)
        return TokenConstraint(self, stop_ids)


_BITS_32 = torch.arange(32, dtype=torch.int32)


class TokenConstraint:
    """One row's parser state: which tokens may come next, and the tokens that came."""

    def __init__(self, grammar: Grammar, stop_ids: Sequence[int]):
        import llguidance

        self.matcher = llguidance.LLMatcher(grammar._engine_tok, grammar._source)
        self.vocab_size = grammar.vocab_size
        self.stop_set = {int(i) for i in stop_ids}
        self.stop_ids = torch.tensor(sorted(self.stop_set), dtype=torch.long)
        self.engine_eos = int(grammar._engine_tok.eos_token)
        self.mask_W = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        self.done = False  # a stop id was sampled: the row has ended

    def allowed_V(self) -> torch.Tensor:
        """Bool (V,) of the tokens that keep the output inside the grammar; a stop id only where the
        output so far is complete. Never all False: a complete output can always stop."""
        if self.done:
            return torch.ones(self.vocab_size, dtype=torch.bool)
        self.matcher.unsafe_compute_mask_ptr(self.mask_W.data_ptr(), self.mask_W.numel() * 4)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        allowed_V = ((self.mask_W[:, None] >> _BITS_32) & 1).bool().view(-1)[:self.vocab_size]
        allowed_V[self.engine_eos] = False
        allowed_V[self.stop_ids] = self.matcher.is_accepting()
        return allowed_V

    def accept(self, token: int) -> None:
        """Advance past a sampled token (a stop id ends the row)."""
        if self.done:
            return
        if token in self.stop_set:
            self.done = True
        elif not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher rejected token {token}: {self.matcher.get_error()}")


def mask_logits(logits_BV: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> torch.Tensor:
    """`logits_BV` with the tokens each row's constraint forbids at -inf (rows with None unchanged)."""
    rows = [b for b, c in enumerate(constraints) if c is not None and not c.done]
    if not rows:
        return logits_BV
    V = logits_BV.shape[-1]
    allowed_RV = torch.stack([constraints[b].allowed_V()[:V] for b in rows]).to(logits_BV.device)
    forbid_BV = torch.zeros(logits_BV.shape, dtype=torch.bool, device=logits_BV.device)
    forbid_BV[torch.tensor(rows, device=logits_BV.device)] = ~allowed_RV
    return logits_BV.masked_fill(forbid_BV, float("-inf"))


def accept_tokens(constraints: Sequence[TokenConstraint | None], tok_B: torch.Tensor) -> None:
    for c, tok in zip(constraints, tok_B.tolist()):
        if c is not None:
            c.accept(tok)
