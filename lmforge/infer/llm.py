"""`LLM`: the Python API for using a trained model.

    from lmforge import LLM
    llm = LLM.load("runs/shakespeare")            # run dir, model/checkpoint dir or Hugging Face folder
    llm = LLM.load("runs/shakespeare", quantize="int8")   # weight-only int8 (or "int4"), see nn/quant.py
    llm.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=200, seed=0)   # -> str
    llm.generate([15, 27, 3], temperature=0)      # -> list of new token ids
    llm.generate("ROMEO:", temperature=0, draft="runs/draft", num_draft_tokens=4)  # speculative decoding
    llm.last_stats                                # its acceptance rate and tokens per target forward
    for piece in llm.stream("ROMEO:"): print(piece, end="")
    llm.chat(messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    llm.generate("Colour:", guided_choice=["red", "green"])   # also guided_regex=, guided_json=schema
    logits = llm.model(torch.tensor([[15, 27, 3]]))  # (batch, time, vocab)
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lmforge.checkpoint import GENERATION_FORMAT, LORA_BASE, TOKENIZER, read_json, resolve_model_dir
from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate as _generate
from lmforge.infer.generate import stream_text
from lmforge.infer.prompt import GenerationFormat, encode_text_prompts, render_chat_prompt
from lmforge.runtime import resolve_device


class LLM:
    """A model, its config and (when it has one) its tokenizer, ready to generate.

    Attributes: `model` (the `Decoder`; calling it on ids (B, T) returns logits (B, T, vocab)),
    `config` (its `DecoderConfig`), `tokenizer` (or None), `path`, `generation_format` (the
    `GenerationFormat` a source-to-target fine-tune recorded, or None: plain continuation),
    `last_stats` (the `SpeculativeStats` of the last speculative `generate`, else None).
    """

    def __init__(self, model: torch.nn.Module, config: Any, tokenizer: Any = None, path: str | Path | None = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        self.last_stats: Any = None
        recorded = getattr(model, "generation_format", None)  # the model directory's file, as the registry read it
        self.generation_format = None if recorded is None else GenerationFormat.from_json(
            recorded, f"{GENERATION_FORMAT} of {self.path or 'this model'}")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None,
             group_size: int | None = None, quantize_embeddings: bool = False,
             adapter: str | Path | None = None) -> "LLM":
        """Load a training run directory (its latest checkpoint), a model/checkpoint directory, or a
        Hugging Face model folder (transformers or sentence-transformers) of any model family, onto
        `device` ('cpu', 'cuda', 'cuda:N', 'mps', 'auto').

        `quantize` "int8" | "int4" quantises the weights as they load (weight-only, see nn/quant.py;
        int4 in groups of `group_size` inputs, default 128; `quantize_embeddings` also the token
        embeddings and LM head). A directory `lmforge quantize` wrote loads quantised as it is.

        `adapter`: a LoRA adapter directory (PEFT's format: adapter_config.json +
        adapter_model.safetensors, from lmforge or PEFT) added to the loaded model (over the
        quantised weights when `quantize` is given)."""
        from lmforge.nn.quant import check_device, quant_config, quantize_model

        device = str(resolve_device(device, "device"))
        if quantize is None and (group_size is not None or quantize_embeddings):
            raise LMForgeError("--group-size and --quantize-embeddings go with --quantize int8|int4")
        qc = None if quantize is None else quant_config(quantize, group_size, quantize_embeddings)
        if qc is not None:
            check_device(qc, device)
        path = Path(path)
        if not path.exists():
            raise LMForgeError(f"checkpoint not found: {path}")
        from lmforge.interop.hf import is_hf_dir, load_hf_dir
        from lmforge.models.registry import load_model_dir

        if is_hf_dir(path):
            model, cfg, tok = load_hf_dir(path, device=device)
        elif (resolve_model_dir(path) / LORA_BASE).is_file():  # a LoRA run: its base + the adapter
            model, cfg, tok = load_lora_model_dir(resolve_model_dir(path), device)
        else:
            model, cfg, tok = load_model_dir(path, device=device)
        if qc is not None:
            quantize_model(model, qc)
        if adapter is not None:
            from lmforge.interop.peft import load_adapter

            load_adapter(model, adapter)
            model.to(device)
        return cls(model.eval(), cfg, tok, path)

    @classmethod
    def of(cls, model: "LLM | str | Path", device: str | torch.device = "cpu") -> "LLM":
        """`model` itself when it is an LLM already, else `LLM.load(model)`."""
        return model if isinstance(model, LLM) else cls.load(model, device=device)

    @property
    def tasks(self) -> frozenset[str]:
        """What this model can do: "generate", "stream", "embed", "classify", "score", "masked_lm"."""
        return self.family.tasks(self.config)

    @property
    def family(self) -> Any:
        """The model's entry in the family registry (what it is and what it can do)."""
        from lmforge.models.registry import family_of

        return family_of(self.model)

    @property
    def continues_prompt(self) -> bool:
        """Whether generated text continues the prompt's text (a decoder without a generation format),
        rather than being a target of its own (encoder-decoders, and models with a generation format)."""
        from lmforge.models.registry import CONTINUE

        return CONTINUE in self.tasks and self.generation_format is None

    def _need(self, capability: str, message: str) -> None:
        if capability not in self.tasks:
            raise LMForgeError(message)

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def eos_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else None

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS plus, for chat models, the end-of-turn token."""
        tok = self.tokenizer
        return set(getattr(tok, "stop_ids", None) or ({self.eos_id} if self.eos_id is not None else set()))

    @property
    def pad_id(self) -> int | None:
        return getattr(self.tokenizer, "pad_id", None) if self.tokenizer is not None else None

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            where = f"the model at {self.path}" if self.path is not None else "this model"
            raise LMForgeError(f"{where} has no tokenizer (no tokenizer.json), so prompts must be lists of token ids")
        return self.tokenizer

    def _encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_text_prompts(self._need_tokenizer(), texts, self.generation_format)

    def prompt_batch(self, prompt: Any) -> tuple[str, list[list[int]]]:
        """(kind, token-id prompts) of what `generate` takes: kind 'text' for a string, 'texts' for a
        list of strings, 'ids' for a list of token ids (see `results_like`)."""
        if isinstance(prompt, str):
            return "text", self._encode_text([prompt])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            if len(prompt) == 0:
                raise LMForgeError("prompt is empty; give a string, a list of strings or a list of token ids")
            if all(isinstance(p, str) for p in prompt):
                return "texts", self._encode_text(list(prompt))
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return "ids", [list(prompt)]
        raise LMForgeError(f"prompt must be a string, a list of strings or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompt: str | Sequence[str] | Sequence[int], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, num_samples: int = 1,
                 num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 no_repeat_ngram_size: int = 0, kv_cache_dtype: str = "auto", draft: "LLM | str | Path | None" = None,
                 num_draft_tokens: int = 4, prompt_lookup_num_tokens: int | None = None,
                 response_format: dict[str, Any] | None = None, guided_json: Any = None,
                 guided_regex: str | None = None, guided_choice: Sequence[str] | None = None) -> Any:
        """Continue `prompt` (for an encoder-decoder, or a model with a generation format: the source;
        the result is the generated target).

        A string gives the generated text (str); a list of token ids gives the list of new ids; a
        list of strings gives one result per string (generated together in one batch). With
        num_samples > 1 each prompt's result is a list of that many samples. temperature 0 is
        greedy; `seed` makes sampling reproducible. Generation stops at the end-of-text token, at
        any `stop` string (not included in the text) or after max_new_tokens. For token-id prompts
        a stop string ends generation and the ids run through the token that completed it.

        `kv_cache_dtype`: "auto" (the model's dtype), "fp32" or "bf16" (half the cache memory).
        Speculative decoding: `draft` (an LLM or a path; a smaller decoder sharing this model's
        tokenizer) guesses `num_draft_tokens` tokens per step, or without a draft
        `prompt_lookup_num_tokens` guesses by copying from the prompt; greedy output is the same as
        without, sampled output has the same distribution, and `last_stats` says what it achieved.

        Structured output (constrained decoding, infer/grammar.py), at most one of: `response_format`
        (OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}, "strict": true}}), `guided_json` (a JSON Schema), `guided_regex`,
        `guided_choice` (a list of strings). Every token is drawn from those the grammar allows
        (temperature, top-k and top-p apply after the mask); the end-of-text token only once the
        output is complete, so a finished output always parses; max_new_tokens can still cut it.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise LMForgeError(f"num_samples must be a positive integer, got {num_samples!r}")
        self._need("generate", f"a {self.family.name} model does not generate text")
        self.last_stats = None
        speculation = self._speculation(draft, num_draft_tokens, prompt_lookup_num_tokens)
        grammar = self.grammar(response_format, guided_json, guided_regex, guided_choice)
        if grammar is not None and (speculation is not None or num_beams > 1):
            raise LMForgeError(f"{grammar.field} works with sampling and greedy decoding; it does not combine with "
                               "beam search or speculative decoding")
        extra = {"speculation": speculation} if speculation else {"grammar": grammar} if grammar else {}
        return self.family.generation_module().generate_for_llm(
            self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, num_samples=num_samples, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
            stop=stop, kv_cache_dtype=kv_cache_dtype, **extra)

    def grammar(self, response_format: dict[str, Any] | None = None, guided_json: Any = None,
                guided_regex: str | None = None, guided_choice: Sequence[str] | None = None) -> Any:
        """The compiled `Grammar` (infer/grammar.py) of whichever structured-output option is given,
        None when none is; a constraint the engine cannot compile raises `GrammarError` naming it."""
        from lmforge.infer.grammar import Grammar

        if all(v is None for v in (response_format, guided_json, guided_regex, guided_choice)):
            return None
        self._need("stream", f"structured output (response_format, guided_*) works with decoder-only models; "
                             f"this is a {self.family.name} model")
        return Grammar.from_options(self.tokenizer, int(self.config.vocab_size), response_format, guided_json,
                                    guided_regex, guided_choice)

    def _speculation(self, draft: "LLM | str | Path | None", num_draft_tokens: int,
                     prompt_lookup_num_tokens: int | None) -> Any:
        """The `Speculation` that generate's arguments ask for (None: plain decoding)."""
        from lmforge.infer.speculative import Speculation, check_draft, check_positive

        if draft is None and prompt_lookup_num_tokens is None:
            return None
        if draft is not None and prompt_lookup_num_tokens is not None:
            raise LMForgeError("give either a draft model or prompt_lookup_num_tokens, not both")
        self._need("stream", f"speculative decoding works with decoder-only models; this is a {self.family.name} "
                             "model")
        if draft is None:
            return Speculation(None, check_positive(prompt_lookup_num_tokens, "prompt_lookup_num_tokens"))
        k = check_positive(num_draft_tokens, "num_draft_tokens")
        draft = LLM.of(draft, device=self.device)
        check_draft(self.model, self.tokenizer, draft.model, draft.tokenizer)
        return Speculation(draft.model, k)

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, repetition_penalty: float = 1.0, stop: str | Sequence[str] | None = None,
               seed: int | None = None, num_samples: int = 1, kv_cache_dtype: str = "auto",
               draft: "LLM | str | Path | None" = None, num_draft_tokens: int = 4,
               prompt_lookup_num_tokens: int | None = None, response_format: dict[str, Any] | None = None,
               guided_json: Any = None, guided_regex: str | None = None,
               guided_choice: Sequence[str] | None = None) -> Iterator[str]:
        """Yield the generated text in pieces as tokens are produced (same settings as `generate`);
        the pieces join to what `generate` returns for the same seed."""
        if not isinstance(prompt, str):
            raise LMForgeError(f"stream takes one string prompt, got {type(prompt).__name__}")
        if num_samples != 1:
            raise LMForgeError("stream produces one sample; use generate(..., num_samples=N) for several")
        self._need("stream", "stream works with decoders; use generate() with an encoder-decoder model")
        (ids,) = self._encode_text([prompt])
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, eos_id=self.stop_ids, stop=stop, seed=seed,
                       kv_cache_dtype=kv_cache_dtype)
        self.last_stats = None
        speculation = self._speculation(draft, num_draft_tokens, prompt_lookup_num_tokens)
        grammar = self.grammar(response_format, guided_json, guided_regex, guided_choice)
        if grammar is not None and speculation is not None:
            raise LMForgeError(f"{grammar.field} does not combine with speculative decoding")
        if speculation is None:
            return stream_text(self.model, self.tokenizer, ids, grammar=grammar, **options)
        from lmforge.infer.speculative import SpeculativeStats, stream_speculative

        self.last_stats = SpeculativeStats()
        return stream_speculative(self.model, self.tokenizer, ids, speculation, self.last_stats, **options)

    # ---- chat ------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None) -> list[int]:
        """Token ids of `messages` rendered with the chat template (and `tools`: schemas or functions),
        ending in the generation prompt."""
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            where = f"the model at {self.path}" if self.path is not None else "this model"
            raise LMForgeError(f"{where} has no chat template; fine-tune it with `lmforge finetune sft` or use "
                               "generate() for plain continuation")
        from lmforge.data.chat import to_messages

        if not isinstance(messages, (list, tuple)) or not messages:
            raise LMForgeError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        checked = to_messages({"messages": list(messages) + [{"role": "assistant", "content": "x"}]}, "messages")[:-1]
        return render_chat_prompt(tok, checked, tools=tools)

    def chat(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop: str | Sequence[str] | None = None, seed: int | None = None, kv_cache_dtype: str = "auto",
             response_format: dict[str, Any] | None = None, guided_json: Any = None,
             guided_regex: str | None = None, guided_choice: Sequence[str] | None = None,
             tools: Sequence[Any] | None = None) -> str:
        """The assistant's reply to a conversation (rendered with the model's chat template, with
        `tools` when given); stops at the end-of-turn token, which is not part of the reply.
        `lmforge.tool_parser.parse_tool_calls` reads the calls in it. Structured output as in `generate`."""
        ids = self.chat_prompt(messages, tools)
        grammar = self.grammar(response_format, guided_json, guided_regex, guided_choice)
        (gen,) = _generate(self.model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, eos_id=self.stop_ids,
                           pad_id=self.pad_id, stop=stop, tokenizer=self.tokenizer, seed=seed,
                           kv_cache_dtype=kv_cache_dtype, grammar=grammar)
        return gen.text

    def chat_stream(self, messages: Sequence[dict[str, Any]], max_new_tokens: int = 256, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    stop: str | Sequence[str] | None = None, seed: int | None = None,
                    kv_cache_dtype: str = "auto", response_format: dict[str, Any] | None = None,
                    guided_json: Any = None, guided_regex: str | None = None,
                    guided_choice: Sequence[str] | None = None, tools: Sequence[Any] | None = None) -> Iterator[str]:
        """`chat`, yielding the reply in pieces as tokens are produced (they join to `chat`'s reply)."""
        ids = self.chat_prompt(messages, tools)
        grammar = self.grammar(response_format, guided_json, guided_regex, guided_choice)
        return stream_text(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos_id=self.stop_ids,
                           stop=stop, seed=seed, kv_cache_dtype=kv_cache_dtype, grammar=grammar)

    def tool_family(self) -> str:
        """The tool-call format of the chat template ("hermes", "llama3"); an error when it renders no tools."""
        from lmforge.tool_parser import template_family

        family = template_family(getattr(self._need_tokenizer(), "chat_template", None))
        if family is None:
            raise LMForgeError("this model's chat template does not render tools (use lmforge's ChatML template, "
                               "a Hermes/Qwen2.5-style or a Llama-3.1-style one)")
        return family

    def run_agent(self, messages: Sequence[dict[str, Any]], tools: dict[str, Any], max_steps: int = 8,
                  confirm: Any = None, on_event: Any = None, **sampling: Any) -> Any:
        """Chat with tools that run: each reply's tool calls are executed and their results sent back,
        until the model answers without a call or after `max_steps` replies (lmforge/infer/agent.py).
        `tools` maps names to functions with type hints and docstrings; `sampling` goes to `chat`.
        Returns an AgentResult (messages, steps, finished, reply)."""
        from lmforge.infer.agent import run_agent

        return run_agent(lambda msgs, schemas: self.chat(msgs, tools=schemas, **sampling), self.tool_family(),
                         messages, tools, max_steps=max_steps, confirm=confirm, on_event=on_event)

    def embed(self, texts: str | Sequence[str], pooling: str | None = None, normalize: bool | None = None,
              batch_size: int = 32) -> torch.Tensor:
        """Text embeddings (N, C). An encoder: pooling "mean" (over real tokens) or "cls", L2-normalised when
        normalize (None = the model's sentence-transformers settings, else "mean" and True). A CLIP model:
        its text tower's projected EOS state, unit length unless normalize=False."""
        self._need("embed", "embed needs an encoder model (BERT family or a sentence-transformers folder) or a "
                            "CLIP model with a text tower")
        return self.family.embedding_module().embed_for_llm(self, texts, pooling=pooling, normalize=normalize,
                                                            batch_size=batch_size)

    def embed_image(self, images: Any, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
        """Image embeddings (N, D) of a CLIP model (PIL images or image file paths), unit length unless
        normalize=False; preprocessed as transformers' CLIPImageProcessor does."""
        from lmforge.infer.clip import embed_images

        self._need("embed_image", f"embed_image needs a CLIP model with a vision tower; this is a {self.family.name} model")
        return embed_images(self.model, images, normalize=normalize, batch_size=batch_size)

    def zero_shot(self, images: Any, labels: Sequence[str], template: str = "a picture of {}",
                  batch_size: int = 32) -> list[dict[str, Any]]:
        """Zero-shot classification of images by label texts (a CLIP model with both towers):
        [{"label", "score", "probs": {label: p}}] per image, the probabilities a softmax over the labels
        of exp(logit_scale) x cos(image, template.format(label))."""
        from lmforge.infer.clip import zero_shot

        self._need("zero_shot", f"zero_shot needs a CLIP model with both towers; this is a {self.family.name} model")
        return zero_shot(self.model, self.tokenizer, images, labels, template=template, batch_size=batch_size)

    def classify(self, texts: str | Sequence[str], text_pairs: Sequence[str] | None = None,
                 batch_size: int = 32, global_attention: str | None = None) -> list[dict[str, Any]]:
        """[{"label": str, "score": float, "probs": {label: p}}] per text, for encoder or decoder classifiers.
        global_attention (longformer encoders): "cls" (the default) | "question" (the first text of each pair)."""
        from lmforge.infer.classify import classify

        return classify(self.model, self.tokenizer, texts, text_pairs, batch_size=batch_size,
                        global_attention=global_attention)

    def score(self, prompt: Any, completion: Any) -> Any:
        """Reward-model score of `completion` as the reply to `prompt` (str or messages) -> float;
        lists of prompts and completions give a list of floats (scored in batches)."""
        from lmforge.infer.score import score

        if isinstance(completion, (list, tuple)) and completion and all(isinstance(c, str) for c in completion):
            prompts = list(prompt) if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt) \
                else [prompt] * len(completion)
            return score(self.model, self.tokenizer, prompts, list(completion))
        return score(self.model, self.tokenizer, [prompt], [completion])[0]

    def report(self, out: str | Path, data: str | Path | None = None, sections: Sequence[str] | str | None = None,
               **options: Any) -> dict[str, Any]:
        """The model card of this model (`lmforge report`): writes out/report.json and out/report.html
        and returns the report. `sections`: bias, memorisation, energy, explain (default all);
        `options`: the sections' options (docs/report.md)."""
        # eval sits above infer: named by path and imported on first use, as the registry does
        report = importlib.import_module("lmforge.eval.report")
        return report.build_report(self, out, data=data, sections=sections or report.ALL, **options)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        qc = getattr(self.model, "quantization", None)
        weights = f"{n / 1e6:.2f}M parameters" if qc is None else f"{qc.scheme} weights"  # int tensors are buffers
        return f"LLM({self.path or 'in-memory'}, {weights}, tokenizer={'yes' if self.tokenizer else 'no'})"


def load_lora_model_dir(directory: Path, device: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, config, tokenizer) of a LoRA run's model directory: the base its LORA_BASE names, made
    into the model the run trained (model_config.json: a classifier keeps the base's body), quantised
    as it trained (QLoRA), with the adapter and its modules_to_save on top."""
    from dataclasses import asdict

    from lmforge.interop.peft import load_adapter
    from lmforge.models.registry import load_tokenizer, read_model_config, read_quantization
    from lmforge.nn.lora import adapter_state_dict, has_lora, merge_lora
    from lmforge.nn.quant import quantize_model

    record = read_json(directory / LORA_BASE)
    base = Path(str(record.get("base", "")))
    if not base.exists():
        raise LMForgeError(f"{directory / LORA_BASE}: the base model {base} this adapter was trained on is not "
                           "there (move it back, or edit the path in that file)")
    base_llm = LLM.load(base, device=device)
    family, cfg = read_model_config(directory)
    model = base_llm.model
    if has_lora(model):  # the base is a LoRA run itself: its adapter folded in, as training started from
        merge_lora(model)
    missing: set[str] = set()
    if type(model) is not family.model_cls or asdict(model.cfg) != asdict(cfg):
        # the run trained a model made from the base (a classifier, PPO's value head): the base's
        # tensors where names and shapes agree, the rest from the adapter's modules_to_save
        with torch.device("meta"):
            own = family.model_cls(cfg)
        own = own.to_empty(device=device)
        ref, want = model.state_dict(), own.state_dict()
        shared = {k: v for k, v in ref.items() if k in want and v.shape == want[k].shape}
        own.load_state_dict(shared, strict=False)
        missing = set(want) - set(shared) - set(getattr(own, "tied_state_keys", lambda: [])())
        model = own
    qc = read_quantization(directory)
    if qc is not None:
        quantize_model(model, qc)
    load_adapter(model, directory)
    missing -= set(adapter_state_dict(model))
    if missing:
        raise LMForgeError(f"{directory}: the base {base} lacks {', '.join(sorted(missing)[:4])} that this model "
                           "needs and the adapter does not hold")
    if hasattr(model, "retie"):
        model.retie()
    if hasattr(model, "rebuild_buffers"):
        model.rebuild_buffers()
    for name, attr in family.dir_files.items():
        setattr(model, attr, read_json(directory / name) if (directory / name).is_file() else None)
    tok = load_tokenizer(family, cfg, directory / TOKENIZER) or base_llm.tokenizer
    return model.to(device), cfg, tok
