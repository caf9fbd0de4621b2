"""Shared pieces of the server tests: a tiny random model with a ChatML tokenizer, and a uvicorn
server on a loopback port in a background thread."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn

from lmforge.infer.llm import LLM
from lmforge.infer.scheduler import Scheduler
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3,
          "héllo wörld 日本語 — the quick brown fox jumps over the lazy dog. " * 3]
NAME = "tiny-test"


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmforge(*args: str) -> list[str]:
    """The `lmforge` command line in a subprocess, with this interpreter."""
    return [sys.executable, "-m", "lmforge.cli", *args]


def make_llm(block_size: int = 128, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> LLM:
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=block_size, init_std=0.3)
    model = Decoder(cfg).eval()
    return LLM(model, cfg, tok)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) until `stop()`."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def start_server(llm: LLM, **cfg_kw) -> tuple[ServerThread, Engine]:
    cfg = ServerConfig(served_model_name=NAME, **cfg_kw)
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      max_model_len=cfg.max_model_len)
    engine = Engine(sched.start(), llm.tokenizer)
    return ServerThread(create_app(cfg, engine=engine)), engine


def slow_down(engine: Engine, seconds: float) -> None:
    """Make every decode step take at least `seconds` (so a test can act mid-stream)."""
    sched = engine.scheduler
    decode = sched._decode

    def slow() -> None:
        time.sleep(seconds)
        decode()
    sched._decode = slow


def offline_ids(llm: LLM, prompt: list[int], max_tokens: int, stop_ids: set[int] | None = None, **kw) -> list[int]:
    """LLM.generate's new ids, cut at the first stop id (EOS / end of turn) as the server stops."""
    ids = llm.generate(prompt, max_new_tokens=max_tokens, **kw)
    stops = llm.tokenizer.stop_ids if stop_ids is None else stop_ids
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids
