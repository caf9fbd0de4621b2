"""The OpenAI-compatible HTTP app: `create_app` and its routes.

A route reads and checks its request (protocol.py), turns it into token ids and scheduler requests
through the engine bridge (engine.py) and answers in OpenAI's format (openai_format.py), streamed as
server-sent events or whole. middleware.py guards every request; metrics.py counts. No model math.
"""

from __future__ import annotations

import html
import logging
import threading
import time
import uuid
from importlib import resources
from types import SimpleNamespace
from typing import AsyncIterator, Callable, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.config import ServerConfig
from lmforge.serve.embeddings import EmbeddingEngine, EmbeddingRequest, embeddings_body
from lmforge.serve.engine import Choices, Engine
from lmforge.serve.metrics import Metrics
from lmforge.serve.middleware import Guard, error_response, read_json
from lmforge.serve.openai_format import ChatFormat, CompletionFormat
from lmforge.tools import tool_call_schema
from lmforge.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ServeError,
                                    TokenizeRequest, unknown_fields)

log = logging.getLogger("lmforge.serve")
router = APIRouter()
RequestT = TypeVar("RequestT", TokenizeRequest, DetokenizeRequest, CompletionRequest, ChatCompletionRequest,
                   EmbeddingRequest)


class AppState:
    """The app's config, its engine once loaded (or why loading failed) and its metrics."""

    def __init__(self, cfg: ServerConfig, engine: Engine | EmbeddingEngine | None):
        self.cfg = cfg
        self.engine = engine
        self.load_error: str | None = None
        self.unknown_fields: set[str] = set()  # request fields already logged as ignored
        self.created = int(time.time())
        sched = lambda: self.engine.scheduler if isinstance(self.engine, Engine) else None  # noqa: E731
        self.metrics = Metrics(queue_length=lambda: sched().num_waiting if sched() else 0,
                               running_batch_size=lambda: sched().num_running if sched() else 0,
                               speculative=lambda: sched().spec_stats if sched() else None)

    def load(self, loader: Callable[[], Engine]) -> None:
        try:
            self.engine = loader()
            log.info("model ready: %s", self.cfg.served_model_name)
        except Exception as e:  # keep answering 503 with the reason
            self.load_error = str(e)
            log.error("loading the model failed: %s", e)

    def log_unknown_fields(self, request: BaseModel) -> None:
        """A warning, once per field name, for each request field this server ignores."""
        for name in unknown_fields(request):
            if name not in self.unknown_fields:
                self.unknown_fields.add(name)
                log.warning("ignored the request field '%s': this server does not support it (logged once per "
                            "field name)", name)

    def ready(self) -> Engine:
        if self.engine is None:
            why = f": {self.load_error}" if self.load_error else "; try again shortly"
            raise ServeError(503, f"the model is not ready{why}")
        return self.engine

    def adapter_of(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` asks for: None for the base model (or no `model`),
        the adapter of that name (`--lora NAME=DIR`), a 404 for any other name."""
        if name is None or name == self.cfg.served_model_name:
            return None
        if name in self.cfg.lora_modules:
            return name
        served = ", ".join(f"`{n}`" for n in [self.cfg.served_model_name, *self.cfg.lora_modules])
        raise ServeError(404, f"The model `{name}` does not exist. This server serves {served}.", param="model")


def create_app(cfg: ServerConfig, engine: Engine | None = None, loader: Callable[[], Engine] | None = None) -> FastAPI:
    """The FastAPI app. Give a ready `engine`, or a `loader` that builds one in a background thread
    (the server answers 503 until it is done)."""
    state = AppState(cfg, engine)
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    if engine is None and loader is not None:
        threading.Thread(target=state.load, args=(loader,), name="lmforge-load", daemon=True).start()
    app.include_router(router)
    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_middleware(Guard, api_key=cfg.api_key, metrics=state.metrics,
                       routes=frozenset(r.path for r in router.routes))
    return app


def _state(request: Request) -> AppState:
    return request.app.state.lmforge


async def _read_request(request: Request, schema: type[RequestT]) -> tuple[AppState, Engine, RequestT]:
    """The app's state, its engine (503 while loading) and the body as `schema`, asking for the
    served model (404 otherwise)."""
    state = _state(request)
    eng = state.ready()
    if (schema is EmbeddingRequest) != isinstance(eng, EmbeddingEngine):  # an encoder embeds; a decoder generates
        raise ServeError(400, f"{request.url.path} is not available for this model: "
                              + ("it is a decoder that generates text; /v1/embeddings needs an encoder model "
                                 "(BERT family, sentence-transformers)" if isinstance(eng, Engine)
                                 else "it is an encoder model, served for /v1/embeddings"), param="model")
    req = await read_json(request, schema, state.cfg.max_body_bytes)
    state.log_unknown_fields(req)
    state.adapter_of(req.model)
    return state, eng, req


# ---- errors ---------------------------------------------------------------------------------------

async def on_serve_error(request: Request, e: ServeError) -> JSONResponse:
    return error_response(e)


async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(ServeError(400, f"invalid request: {e.errors()[0].get('msg', 'invalid value')}"))


async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if e.status_code == 404 else None
    msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return error_response(ServeError(e.status_code, msg, code=code))


# ---- plain routes ---------------------------------------------------------------------------------

@router.get("/health")
async def health(request: Request) -> Response:
    _state(request).ready()
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=Metrics.CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request) -> HTMLResponse:
    page = resources.files("lmforge.serve").joinpath("chat.html").read_text(encoding="utf-8")
    return HTMLResponse(page.replace("{{MODEL_NAME}}", html.escape(_state(request).cfg.served_model_name)))


def _model_card(state: AppState, eng: Engine, name: str) -> dict:
    """The base model's card, or (as vLLM lists them) a LoRA adapter's: its directory as `root`, the
    base model as `parent`."""
    base = state.cfg.served_model_name
    adapter = state.adapter_of(name)
    root = state.cfg.lora_modules[adapter] if adapter else eng.model_path or name
    return {"id": name, "object": "model", "created": state.created, "owned_by": "lmforge",
            "root": root, "parent": base if adapter else None, "max_model_len": eng.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    state = _state(request)
    eng = state.ready()
    return {"object": "list", "data": [_model_card(state, eng, name)
                                       for name in [state.cfg.served_model_name, *state.cfg.lora_modules]]}


@router.get("/v1/models/{name:path}")
async def model_info(request: Request, name: str) -> dict:
    state = _state(request)
    return _model_card(state, state.ready(), name)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict:
    _, eng, req = await _read_request(request, TokenizeRequest)
    tok = eng.require_tokenizer("prompt" if req.messages is None else "messages")
    if (req.prompt is None) == (req.messages is None):
        raise ServeError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
    if req.messages is not None:
        ids = eng.chat_prompt(req.messages)
    else:
        ids = tok.encode_prompt(req.prompt) if req.add_special_tokens else tok.encode(req.prompt, allow_special=True)
    return {"tokens": list(ids), "count": len(ids), "max_model_len": eng.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict:
    _, eng, req = await _read_request(request, DetokenizeRequest)
    tok = eng.require_tokenizer("tokens")
    eng.check_ids(req.tokens, "tokens")
    return {"prompt": tok.decode(req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    eng = _state(request).ready()
    if not isinstance(eng, Engine):
        raise ServeError(400, "/tokenizer_info is not available for an encoder model served for embeddings")
    tok = eng.require_tokenizer(None)
    return {"tokenizer_class": type(tok).__name__, "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None), "pad_token": getattr(tok, "pad_token", None),
            "chat_template": getattr(tok, "chat_template", None), "model_max_length": eng.max_model_len,
            "vocab_size": getattr(tok, "vocab_size", None)}


# ---- generation -----------------------------------------------------------------------------------

@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state, eng, req = await _read_request(request, CompletionRequest)
    if req.suffix:
        raise ServeError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of not in (None, 1, req.n):
        raise ServeError(400, "best_of other than n is not supported by this server", param="best_of")
    texts, prompts = eng.completion_prompts(req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise ServeError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    sampling = req.sampling_request(max_tokens, req.logprobs, prompt_logprobs=echo_logprobs,
                                    adapter=state.adapter_of(req.model))
    sampling.grammar = eng.grammar(req)
    if state.cfg.log_prompts:
        log.info("%s prompt: %r", request.state.req_id, req.prompt)
    choices = eng.submit(prompts, req.n, sampling, state.metrics)
    fmt = CompletionFormat(eng.tokenizer, req, texts, prompts)
    return await _respond(request, choices, fmt, req.stream, f"cmpl-{uuid.uuid4().hex}")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state, eng, req = await _read_request(request, ChatCompletionRequest)
    req.check_tools()
    if req.top_logprobs is not None and not req.logprobs:
        raise ServeError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    ids = eng.chat_prompt(req.messages, req.add_generation_prompt, req.template_tools())
    if state.cfg.log_prompts:
        log.info("%s messages: %r", request.state.req_id, [m.model_dump() for m in req.messages])
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = asked if asked is not None else max(1, eng.max_model_len - len(ids))
    sampling = req.sampling_request(max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                    adapter=state.adapter_of(req.model))
    sampling.grammar = eng.grammar(req)
    forced = req.forced_tool_choice()
    if forced is not None:  # the reply is constrained to the calls tool_choice allows, as vLLM does
        schema = tool_call_schema(req.template_tools(), forced, req.parallel_tool_calls)
        sampling.grammar = eng.grammar(SimpleNamespace(response_format=None, guided_json=schema, guided_regex=None,
                                                       guided_choice=None))
    fmt = ChatFormat(eng.tokenizer, req, ids)
    choices = eng.submit([ids], req.n, sampling, state.metrics, prompt_param="messages")
    return await _respond(request, choices, fmt, req.stream, f"chatcmpl-{uuid.uuid4().hex}")


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> dict:
    state, eng, req = await _read_request(request, EmbeddingRequest)
    vectors, tokens = await eng.embed(eng.texts(req))
    request.state.info = f"prompt={tokens} "
    return embeddings_body(vectors, req.encoding_format, state.cfg.served_model_name, tokens)


async def _respond(request: Request, choices: Choices, fmt: CompletionFormat | ChatFormat, stream: bool,
                   rid: str) -> Response:
    """The response to a generation request: a stream of events, or the whole body once every
    choice has finished."""
    created, model = int(time.time()), fmt.req.model or _state(request).cfg.served_model_name  # as asked
    if stream:
        return _event_stream(request, choices, fmt.stream(rid, created, model, choices.batches(), len(choices.handles)))
    body = fmt.full(rid, created, model, await choices.collect(request.is_disconnected))
    request.state.info = f"prompt={body['usage']['prompt_tokens']} completion={body['usage']['completion_tokens']} "
    return JSONResponse(body)


def _event_stream(request: Request, choices: Choices, events: AsyncIterator[str]) -> StreamingResponse:
    request.state.streaming = True

    async def body() -> AsyncIterator[str]:
        ended = "client left"
        try:
            async for piece in events:
                yield piece
            ended = "done"
        finally:  # finished, or the client went away: free every slot this request holds
            choices.cancel()
            log.info("%s %s %s 200 prompt=%d completion=%d stream %s %.3fs", request.state.req_id, request.method,
                     request.url.path, choices.prompt_tokens, choices.completion_tokens, ended,
                     time.monotonic() - request.state.t0)
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
