"""/v1/embeddings for encoder models (BERT family, sentence-transformers folders) and the text tower of
CLIP models (their projected, unit-length text embeddings, as `LLM.embed`): the request
schema, the engine that embeds (one batch at a time, off the event loop) and OpenAI's response body,
with `encoding_format` "float" (a list of numbers) or "base64" (the float32 little-endian bytes, as
OpenAI sends them: `numpy.frombuffer(base64.b64decode(s), dtype="<f4")` reads them back)."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, Field

from lmforge.errors import LMForgeError
from lmforge.serve.protocol import ServeError, StrictModel


class EmbeddingRequest(BaseModel):
    model_config = StrictModel
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class EmbeddingEngine:
    """An encoder or CLIP model served for embeddings: `LLM.embed` (the model's pooling and normalisation)."""

    def __init__(self, llm: Any, model_path: str | None = None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_path = model_path
        self.max_model_len = int(llm.model.cfg.block_size)
        # a CLIP model's embeddings live in its projection space, an encoder's are its hidden states
        self.width = int(getattr(llm.model.cfg, "embedding_dim", llm.model.cfg.n_embd))
        self._lock = threading.Lock()  # one batch at a time: torch already uses the model's threads

    def texts(self, req: EmbeddingRequest) -> list[str]:
        inputs = [req.input] if isinstance(req.input, str) else req.input
        if not inputs:
            raise ServeError(400, "input is empty", param="input")
        if not all(isinstance(x, str) for x in inputs):
            raise ServeError(400, "this server embeds text; send input as a string or a list of strings, not token ids",
                             param="input")
        if any(not x for x in inputs):
            raise ServeError(400, "input contains an empty string", param="input")
        if req.dimensions is not None and req.dimensions != self.width:
            raise ServeError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                                  f"{self.width}", param="dimensions")
        return inputs

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        with self._lock:
            vectors = self.llm.embed(texts).float().cpu().numpy()
            tokens = sum(len(ids) for ids in self.tokenizer.encode_pairs(texts, None, self.max_model_len)[0])
        return vectors, tokens

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(N, C) float32 embeddings and the number of tokens read."""
        try:
            return await asyncio.to_thread(self._embed, texts)
        except LMForgeError as e:
            raise ServeError(400, str(e), param="input") from None


def embeddings_body(vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> dict[str, Any]:
    def encode(v: np.ndarray) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
