"""`lmforge serve MODEL`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

    lmforge serve runs/demo --port 8000
    lmforge serve runs/base --lora sql=runs/sql-lora --lora chat=runs/chat-lora   # requests pick by `model`
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "ROMEO:", "max_tokens": 32}'

Routes: /v1/completions, /v1/chat/completions (decoders), /v1/embeddings (encoders), /v1/models, /health, /tokenize, /detokenize,
/tokenizer_info, /metrics and a web chat page at /. The modules, by job: app.py (create_app and
the routes), protocol.py (request schemas, errors), engine.py (the bridge to the scheduler),
openai_format.py (response bodies and stream chunks), embeddings.py (/v1/embeddings), middleware.py
(API key, log lines, body limit), metrics.py (Prometheus), config.py (ServerConfig), adapters.py (`--lora`),
client.py (`lmforge chat --url`).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any, Sequence

from lmforge.errors import LMForgeError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_batch: int = 32, max_queue: int = 256,
          max_model_len: int | None = None, device: str = "cpu", log_prompts: bool = False,
          threads: int | None = None, quantize: str | None = None, group_size: int | None = None,
          quantize_embeddings: bool = False, kv_cache_dtype: str = "auto", draft: str | None = None,
          num_draft_tokens: int = 4, lora: Sequence[str] = ()) -> None:
    """Load MODEL (anything `LLM.load` accepts) in the background and serve it until interrupted.
    The model computes on `threads` CPU threads (None: `runtime.default_threads()`, which leaves
    cores to the HTTP side). A model that fails to load stops the server with an LMForgeError (the
    CLI's one-line error). `quantize` / `group_size` / `quantize_embeddings`: as `LLM.load`.
    `kv_cache_dtype` ("auto", "fp32", "bf16") is the KV cache's storage; `draft` (a model sharing
    MODEL's tokenizer) turns on speculative decoding with `num_draft_tokens` guesses per step.
    `lora`: "NAME=DIR" LoRA adapters served on MODEL, picked by the request's `model` (serve/adapters.py)."""
    import socket

    import uvicorn
    from pathlib import Path

    from lmforge.runtime import default_threads, resolve_device
    from lmforge.serve.adapters import load_lora_modules, lora_modules
    from lmforge.serve.app import create_app
    from lmforge.serve.config import ServerConfig
    from lmforge.serve.engine import Engine
    from lmforge.nn.kv_cache import kv_cache_dtype as kv_cache_dtype_of

    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise LMForgeError(f"--port must be 1..65535, got {port}")
    resolve_device(device, "--device")
    if quantize is not None or group_size is not None or quantize_embeddings:
        from lmforge.nn.quant import quant_config

        quant_config(quantize, group_size, quantize_embeddings)  # a bad option fails before the server starts
    if not Path(model).exists():
        raise LMForgeError(f"model not found: {model}")
    if draft is not None and not Path(draft).exists():
        raise LMForgeError(f"draft model not found: {draft}")
    kv_cache_dtype_of(kv_cache_dtype)
    if not _is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    name = served_model_name or Path(model).resolve().name
    adapters = lora_modules(lora, name)
    cfg = ServerConfig(served_model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                       max_model_len=max_model_len, log_prompts=log_prompts, model_path=str(model),
                       threads=threads if threads is not None else default_threads(), quantize=quantize,
                       group_size=group_size, quantize_embeddings=quantize_embeddings,
                       kv_cache_dtype=kv_cache_dtype, draft=draft, num_draft_tokens=num_draft_tokens,
                       lora_modules=adapters)

    failed: list[BaseException] = []
    holder: dict[str, Any] = {}

    def load() -> Any:
        try:
            return load_model()
        except BaseException as e:  # stop serving: a server that can never be ready is no use
            failed.append(e)
            if "server" in holder:
                holder["server"].should_exit = True
            raise

    def load_model() -> Any:
        from lmforge.infer.llm import LLM

        llm = LLM.load(model, device=device, quantize=cfg.quantize, group_size=cfg.group_size,
                       quantize_embeddings=cfg.quantize_embeddings)
        if adapters:
            load_lora_modules(llm.model, adapters)
        if "embed" in llm.tasks:  # an encoder: served for /v1/embeddings
            from lmforge.serve.embeddings import EmbeddingEngine

            return EmbeddingEngine(llm, str(model))
        if "generate" not in llm.tasks:
            raise LMForgeError(f"{model} is a {llm.family.name} model that neither generates nor embeds text "
                               f"(it can: {', '.join(sorted(llm.tasks))}); the server has nothing to serve it for")
        ctx = int(llm.model.cfg.block_size)
        if max_model_len is not None and max_model_len > ctx:
            raise LMForgeError(f"--max-model-len {max_model_len} is longer than the model's context ({ctx})")
        engine = Engine.from_llm(llm, cfg, draft=None if draft is None else LLM.load(draft, device=device))
        sched = engine.scheduler
        logging.getLogger("lmforge.serve").info(
            "KV cache: %.0f MiB %s (%d sequences x %d tokens; --max-batch / --max-model-len / --kv-cache-dtype "
            "change it); model threads: %d (--threads sets them)%s", sched.cache.nbytes() / 2**20,
            str(sched.cache.dtype).removeprefix("torch."), sched.max_batch, sched.max_model_len, sched.num_threads,
            "" if draft is None else f"; speculative decoding with {draft}, {num_draft_tokens} guesses per step")
        if adapters:
            logging.getLogger("lmforge.serve").info("LoRA adapters (request `model`): %s",
                                                    ", ".join(f"{n}={d}" for n, d in adapters.items()))
        return engine

    # bind first: a taken port is a one-line error before anything loads
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LMForgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app = create_app(cfg, loader=load)
    print(f"lmforge serve: {name} on http://{host}:{port} (loading; /health answers 200 when ready)", file=sys.stderr)
    server = holder["server"] = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                              timeout_graceful_shutdown=5))
    if failed:
        server.should_exit = True
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failed:
        e = failed[0]
        raise LMForgeError(str(e)) if isinstance(e, LMForgeError) else e
