"""`HTTPBackend`: the `lmforge chat --url URL` backend, talking to a running `lmforge serve` (or any
OpenAI-compatible server with vLLM's /tokenize) over HTTP. Standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Iterator

from lmforge.errors import LMForgeError


class HTTPBackend:
    """Same three methods as `lmforge.chat.LocalBackend`: stream, count_tokens, context_length."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.api_key = api_key
        self.timeout = timeout
        models = self._json("GET", "/v1/models")
        data = models.get("data") or []
        if not data:
            raise LMForgeError(f"{self.url} serves no model")
        entry = next((m for m in data if m.get("id") == model), None) if model else data[0]
        if entry is None:
            raise LMForgeError(f"{self.url} does not serve '{model}'; it serves {', '.join(m['id'] for m in data)}")
        self.model = entry["id"]
        self._max_len = entry.get("max_model_len")
        try:
            info = self._json("GET", "/tokenizer_info")
            self.has_template = bool(info.get("chat_template"))
        except LMForgeError:
            self.has_template = True  # a server without /tokenizer_info: assume a chat model

    # ---- HTTP --------------------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read().decode("utf-8", "replace"))["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise LMForgeError(f"{self.url}{path}: {e.code} {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LMForgeError(f"cannot reach {self.url}: {reason}") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read().decode("utf-8"))

    # ---- backend methods ------------------------------------------------------------------------

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        body: dict[str, Any] = {"model": self.model, "stream": True}
        names = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "repetition_penalty": "repetition_penalty", "seed": "seed"}
        for key, value in sampling.items():
            if value is not None and key in names:
                body[names[key]] = value
        if self.has_template:
            body["messages"] = messages
            path = "/v1/chat/completions"
        else:
            body["prompt"] = messages[-1]["content"]  # plain continuation, as LocalBackend does
            path = "/v1/completions"
        return self._events(path, body)

    def _events(self, path: str, body: dict) -> Iterator[str]:
        resp = self._open("POST", path, body)
        try:  # closing the response (Ctrl-C) drops the connection: the server frees the slot
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise LMForgeError(f"{self.url}{path}: {chunk['error'].get('message')}")
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        yield piece
        finally:
            resp.close()

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        body = {"messages": messages} if self.has_template else {"prompt": messages[-1]["content"]}
        try:
            return int(self._json("POST", "/tokenize", {"model": self.model, **body})["count"])
        except (LMForgeError, KeyError, ValueError):
            return None  # the server cannot count: let it answer 400 if the conversation is too long

    def context_length(self) -> int | None:
        return self._max_len
