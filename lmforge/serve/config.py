"""`ServerConfig`: what `lmforge serve` was asked for: the served name (and its LoRA adapters' names),
limits, auth and logging."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this is refused (413)


@dataclass
class ServerConfig:
    served_model_name: str = "lmforge"
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_model_len: int | None = None  # default: the model's context
    log_prompts: bool = False
    max_body_bytes: int = MAX_BODY_BYTES
    model_path: str | None = None
    threads: int | None = None  # torch threads of the scheduler thread (None: torch's default)
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "fp32" or "bf16"
    draft: str | None = None  # a draft model for speculative decoding (same tokenizer)
    num_draft_tokens: int = 4  # guesses per speculative step
    quantize: str | None = None  # weight-only quantisation on load: "int8" | "int4" (None: as stored)
    group_size: int | None = None  # int4 group size (None: 128)
    quantize_embeddings: bool = False  # also the token embeddings and LM head
    lora_modules: dict[str, str] = field(default_factory=dict)  # served LoRA adapters: model name -> directory
