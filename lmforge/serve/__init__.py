"""`lmforge serve MODEL`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

    lmforge serve runs/demo --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "ROMEO:", "max_tokens": 32}'

Routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /tokenize, /detokenize,
/tokenizer_info, /metrics and a web chat page at /. See lmforge/serve/app.py.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

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
          max_model_len: int | None = None, device: str = "cpu", log_prompts: bool = False) -> None:
    """Load MODEL (anything `LLM.load` accepts) in the background and serve it until interrupted."""
    import uvicorn
    from pathlib import Path

    from lmforge.serve.app import Engine, ServerConfig, create_app

    if not Path(model).exists():
        raise LMForgeError(f"model not found: {model}")
    if not _is_loopback(host) and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    name = served_model_name or Path(model).resolve().name
    cfg = ServerConfig(served_model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                       max_model_len=max_model_len, log_prompts=log_prompts, model_path=str(model))

    def load() -> Any:
        from lmforge.infer.llm import LLM

        llm = LLM.load(model, device=device)
        ctx = int(llm.model.cfg.block_size)
        if max_model_len is not None and max_model_len > ctx:
            raise LMForgeError(f"--max-model-len {max_model_len} is longer than the model's context ({ctx})")
        engine = Engine.from_llm(llm, cfg)
        sched = engine.scheduler
        logging.getLogger("lmforge.serve").info(
            "KV cache: %.0f MiB (%d sequences x %d tokens; --max-batch / --max-model-len change it)",
            sched.cache.nbytes() / 2**20, sched.max_batch, sched.max_model_len)
        return engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app = create_app(cfg, loader=load)
    print(f"lmforge serve: {name} on http://{host}:{port} (loading; /health answers 200 when ready)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
