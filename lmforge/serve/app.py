"""The OpenAI-compatible HTTP server: FastAPI routes, SSE streaming, errors, metrics.

HTTP only: requests become `GenerationRequest`s for the scheduler (lmforge/infer/scheduler.py),
whose thread owns the model; its per-token outputs cross into the event loop through an
asyncio queue per HTTP request. No model math here.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LMForgeError
from lmforge.infer.scheduler import GenerationRequest, QueueFull, Scheduler, StepOutput, TokenLogprob
from lmforge.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ServeError,
                                    TokenizeRequest, validation_error)

log = logging.getLogger("lmforge.serve")

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this is refused (413)
OPEN_PATHS = {"/", "/health", "/metrics", "/favicon.ico"}  # no API key needed


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


class Engine:
    """What the routes need: the scheduler, the tokenizer and the model's limits."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, model_path: str | None = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_model_len = scheduler.max_model_len
        self.model_path = model_path

    @classmethod
    def from_llm(cls, llm: Any, cfg: ServerConfig) -> "Engine":
        sched = Scheduler(llm.model, llm.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                          max_model_len=cfg.max_model_len, num_threads=cfg.threads)
        return cls(sched.start(), llm.tokenizer, str(llm.path) if llm.path is not None else None)


class Metrics:
    def __init__(self, state: "AppState"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        queue = Gauge("lmforge_queue_length", "requests waiting for a slot", registry=r)
        queue.set_function(lambda: state.engine.scheduler.num_waiting if state.engine else 0)
        running = Gauge("lmforge_running_batch_size", "sequences in the running batch", registry=r)
        running.set_function(lambda: state.engine.scheduler.num_running if state.engine else 0)
        buckets = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from request to first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("lmforge_time_per_output_token_seconds", "time between consecutive tokens of a sequence",
                             buckets=buckets, registry=r)


class AppState:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.mailbox: Any = None  # _Mailbox of the running event loop
        self.metrics = Metrics(self)


# ---- helpers --------------------------------------------------------------------------------------

def _error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ServeError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class _Mailbox:
    """Carries outputs from the scheduler thread into the event loop with at most one wake-up of the
    loop per batch of outputs (a decode step of 32 sequences makes one hand-over, not 32; each
    hand-over is a syscall and a fight for the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


class _Choices:
    """The outputs of one HTTP request's sequences, delivered into the event loop."""

    def __init__(self, mailbox: _Mailbox, metrics: Metrics):
        self.mailbox = mailbox
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.metrics = metrics
        self.handles: list[int] = []
        self.completion: dict[int, int] = {}  # tokens generated per choice so far
        self.prompt_tokens = 0

    def callback(self, index: int) -> Callable[[StepOutput], None]:
        t0 = time.monotonic()
        last = [None]

        def on_output(out: StepOutput) -> None:  # scheduler thread
            now = time.monotonic()
            self.completion[index] = out.completion_tokens
            if out.token_ids:
                if last[0] is None:
                    self.metrics.ttft.observe(now - t0)
                else:
                    self.metrics.itl.observe(now - last[0])
                last[0] = now
                self.metrics.generation_tokens.inc(len(out.token_ids))
            self.mailbox.post(self.queue, (index, out))
        return on_output


class _Guard:
    """Plain ASGI middleware (BaseHTTPMiddleware would add a queue hop to every stream chunk): the
    API key, one log line per request, request metrics, and a JSON 500 for a bug."""

    def __init__(self, app: Callable, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, metrics = self.state.cfg, self.state.metrics
        t0 = time.monotonic()
        st = scope.setdefault("state", {})
        st.update(t0=t0, info="", streaming=False, req_id=f"req-{uuid.uuid4().hex[:16]}")
        path, method = scope["path"], scope["method"]
        status = [0]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if cfg.api_key is not None and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                scheme, _, key = given.partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), cfg.api_key.encode()):
                    raise ServeError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.")
            await self.app(scope, receive, send_status)
        except Exception as e:
            if not isinstance(e, ServeError):  # a bug; never a bare 500 page
                log.exception("unhandled error on %s", path)
                e = ServeError(500, f"internal error: {type(e).__name__}")
            if status[0] == 0:
                try:
                    await _error_response(e)(scope, receive, send_status)
                except OSError:  # the client is gone (499): nobody to answer
                    status[0] = e.status
        route = path if path in _ROUTES else "other"
        metrics.requests.labels(route, str(status[0])).inc()
        if not st["streaming"]:  # a stream logs its line when it ends (_sse)
            log.info("%s %s %s %d %s%.3fs", st["req_id"], method, path, status[0], st["info"], time.monotonic() - t0)


# ---- the app --------------------------------------------------------------------------------------

def create_app(cfg: ServerConfig, engine: Engine | None = None, loader: Callable[[], Engine] | None = None) -> FastAPI:
    """The FastAPI app. Give a ready `engine`, or a `loader` that builds one in a background thread
    (the server answers 503 until it is done)."""
    state = AppState(cfg)
    state.engine = engine
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    metrics = state.metrics

    if engine is None and loader is not None:
        def load() -> None:
            try:
                state.engine = loader()
                log.info("model ready: %s", cfg.served_model_name)
            except Exception as e:  # keep answering 503 with the reason
                state.load_error = str(e)
                log.error("loading the model failed: %s", e)
        threading.Thread(target=load, name="lmforge-load", daemon=True).start()

    app.add_middleware(_Guard, state=state)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(ServeError(400, f"invalid request: {e.errors()[0].get('msg', 'invalid value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ServeError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    def ready() -> Engine:
        if state.engine is None:
            why = f": {state.load_error}" if state.load_error else "; try again shortly"
            raise ServeError(503, f"the model is not ready{why}")
        return state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.served_model_name:
            raise ServeError(404, f"The model `{name}` does not exist. This server serves `{cfg.served_model_name}`.",
                             param="model")

    # ---- plain routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("lmforge.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL_NAME}}", html.escape(cfg.served_model_name)))

    @app.get("/v1/models")
    async def models() -> dict:
        eng = ready()
        return {"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": state.created, "owned_by": "lmforge",
            "root": eng.model_path or cfg.served_model_name, "parent": None, "max_model_len": eng.max_model_len}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> dict:
        eng = ready()
        check_model(name)
        return {"id": name, "object": "model", "created": state.created, "owned_by": "lmforge",
                "root": eng.model_path or name, "parent": None, "max_model_len": eng.max_model_len}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        eng = ready()
        req = await _read_json(request, TokenizeRequest, cfg.max_body_bytes)
        check_model(req.model)
        tok = _need_tokenizer(eng)
        if (req.prompt is None) == (req.messages is None):
            raise ServeError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = _render_chat(eng, req.messages)
        else:
            ids = tok.encode_prompt(req.prompt) if req.add_special_tokens else tok.encode(req.prompt, allow_special=True)
        return {"tokens": list(ids), "count": len(ids), "max_model_len": eng.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        eng = ready()
        req = await _read_json(request, DetokenizeRequest, cfg.max_body_bytes)
        check_model(req.model)
        tok = _need_tokenizer(eng)
        _check_ids(eng, req.tokens, "tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        eng = ready()
        tok = _need_tokenizer(eng)
        return {"tokenizer_class": type(tok).__name__, "eos_token": getattr(tok, "eos_token", None),
                "bos_token": getattr(tok, "bos_token", None), "pad_token": getattr(tok, "pad_token", None),
                "chat_template": getattr(tok, "chat_template", None), "model_max_length": eng.max_model_len,
                "vocab_size": getattr(tok, "vocab_size", None)}

    # ---- generation -----------------------------------------------------------------------------

    def sampling(req: Any, max_tokens: int, logprobs: int | None) -> dict:
        bias = None
        if req.logit_bias:  # OpenAI's keys are token ids as strings
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise ServeError(400, "logit_bias keys must be token ids (integers as strings), got "
                                      f"{', '.join(repr(k) for k in req.logit_bias)}", param="logit_bias") from None
        if req.stream_options is not None and not req.stream:  # as OpenAI and vLLM answer
            raise ServeError(400, "stream_options is only allowed when stream is true", param="stream_options")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_k = None if req.top_k in (None, -1, 0) else req.top_k
        top_p = None if req.top_p in (None, 1.0) else req.top_p
        return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=req.min_p,
                    repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, logit_bias=bias, stop=_stops(req.stop),
                    stop_token_ids=list(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, logprobs=logprobs,
                    skip_special_tokens=req.skip_special_tokens)

    def submit_all(eng: Engine, prompts: list[list[int]], n: int, seed: int | None, kw: dict,
                   prompt_logprobs: int | None = None) -> _Choices:
        """One sequence per (prompt, sample); choice index = prompt_index * n + i. Sample i of a
        seeded request uses (seed + i) mod 2**64, so choice 0 matches the same request with n=1."""
        reqs = []
        for p in prompts:
            for i in range(n):
                reqs.append(GenerationRequest(p, seed=None if seed is None else (seed + i) % 2**64,
                                              prompt_logprobs=prompt_logprobs, **kw))
        for r in reqs:
            try:
                eng.scheduler.validate(r)
            except LMForgeError as e:
                raise ServeError(400, str(e), param=_param_of(str(e))) from None
        if len(reqs) > cfg.max_queue:
            raise ServeError(400, f"this request asks for {len(reqs)} sequences (prompts x n); the limit is "
                                  f"{cfg.max_queue}", param="n")
        if state.mailbox is None or state.mailbox.loop is not asyncio.get_running_loop():
            state.mailbox = _Mailbox(asyncio.get_running_loop())
        choices = _Choices(state.mailbox, metrics)
        try:
            for i, r in enumerate(reqs):
                choices.handles.append(eng.scheduler.submit(r, choices.callback(i)))
        except QueueFull as e:
            for h in choices.handles:
                eng.scheduler.cancel(h)
            raise ServeError(429, str(e)) from None
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        choices.prompt_tokens = sum(len(p) for p in prompts)
        return choices

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        eng = ready()
        req = await _read_json(request, CompletionRequest, cfg.max_body_bytes)
        check_model(req.model)
        if req.suffix:
            raise ServeError(400, "suffix is not supported by this server", param="suffix")
        if req.best_of not in (None, 1, req.n):
            raise ServeError(400, "best_of other than n is not supported by this server", param="best_of")
        texts, prompts = _completion_prompts(eng, req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ServeError(400, "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
        kw = sampling(req, max_tokens, req.logprobs)
        if cfg.log_prompts:
            log.info("%s prompt: %r", request.state.req_id, req.prompt)
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        choices = submit_all(eng, prompts, req.n, req.seed, kw, prompt_logprobs=echo_lp)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        fmt = _CompletionFormat(eng, req, texts, prompts)
        if req.stream:
            return _sse(request, eng, choices, fmt.stream(rid, created, cfg.served_model_name, choices))
        outs = await _collect(request, eng, choices)
        request.state.info = _usage_info(prompts, outs)
        return JSONResponse(fmt.full(rid, created, cfg.served_model_name, outs))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        eng = ready()
        req = await _read_json(request, ChatCompletionRequest, cfg.max_body_bytes)
        check_model(req.model)
        if req.tools:
            raise ServeError(400, "tools are not supported by this server", param="tools")
        kind = (req.response_format or {}).get("type", "text")
        if kind != "text":  # a reply that merely looks like JSON would be worse than a clear refusal
            raise ServeError(400, f"response_format type '{kind}' is not supported by this server (no constrained "
                                  "decoding); only 'text'", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        ids = _render_chat(eng, req.messages, req.add_generation_prompt)
        if cfg.log_prompts:
            log.info("%s messages: %r", request.state.req_id, [m.model_dump() for m in req.messages])
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = asked if asked is not None else max(1, eng.max_model_len - len(ids))
        kw = sampling(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        choices = submit_all(eng, [ids], req.n, req.seed, kw)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        fmt = _ChatFormat(eng, req, ids)
        if req.stream:
            return _sse(request, eng, choices, fmt.stream(rid, created, cfg.served_model_name, choices))
        outs = await _collect(request, eng, choices)
        request.state.info = _usage_info([ids], outs)
        return JSONResponse(fmt.full(rid, created, cfg.served_model_name, outs))

    return app


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
           "/v1/completions", "/v1/chat/completions"}


def _param_of(message: str) -> str | None:
    for key in ("logit_bias", "max_tokens", "min_p", "temperature", "top_k", "top_p", "repetition_penalty", "stop"):
        if key in message:
            return key
    if "prompt" in message or "context length" in message:
        return "prompt"
    return None


def _need_tokenizer(eng: Engine) -> Any:
    if eng.tokenizer is None:
        raise ServeError(400, "this model has no tokenizer; send prompts as token ids")
    return eng.tokenizer


def _check_ids(eng: Engine, ids: list[int], param: str) -> None:
    vocab = eng.scheduler.vocab
    for t in ids:
        if not 0 <= t < vocab:
            raise ServeError(400, f"token id {t} is outside the model's vocabulary (0..{vocab - 1})", param=param)


def _completion_prompts(eng: Engine, prompt: Any) -> tuple[list[str | None], list[list[int]]]:
    """(prompt texts, or None for token-id prompts; token ids used verbatim)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ServeError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    texts, ids = [], []
    for p in prompt:
        if isinstance(p, str):
            tok = _need_tokenizer(eng)
            row = tok.encode_prompt(p)
            if not row:
                eos = getattr(tok, "eos_id", None)
                if eos is None:
                    raise ServeError(400, "prompt is empty", param="prompt")
                row = [eos]  # an empty prompt starts a new document, as LLM.generate does
            texts.append(p)
        else:
            row = list(p)
            if not row:
                raise ServeError(400, "prompt is empty", param="prompt")
            _check_ids(eng, row, "prompt")
            texts.append(None)
        ids.append(row)
    return texts, ids


def _render_chat(eng: Engine, messages: list, add_generation_prompt: bool = True) -> list[int]:
    tok = _need_tokenizer(eng)
    if getattr(tok, "chat_template", None) is None or not hasattr(tok, "apply_chat_template"):
        raise ServeError(400, "this model has no chat template, so /v1/chat/completions cannot format messages; "
                              "use /v1/completions with a prompt", param="messages")
    msgs = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception:
            if not any(m["role"] == "developer" for m in msgs):
                raise
            # OpenAI's "developer" role is the system role of newer models: a template that does not
            # know it (most; ChatML among them) gets "system" instead
            msgs = [{**m, "role": "system"} if m["role"] == "developer" else m for m in msgs]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    except LMForgeError as e:
        raise ServeError(400, str(e), param="messages") from None
    except Exception as e:  # jinja raises its own errors for messages a template rejects
        raise ServeError(400, f"the chat template could not format these messages: {e}", param="messages") from None
    return list(ids)


def _usage_info(prompts: list[list[int]], outs: list[Any]) -> str:
    return f"prompt={sum(len(p) for p in prompts)} completion={sum(o.completion_tokens for o in outs)} "


@dataclass
class _Out:
    """One choice, gathered."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    completion_tokens: int = 0
    error: str | None = None


def _merge(outs: list[tuple[int, StepOutput]]) -> list[tuple[int, StepOutput]]:
    """Coalesce consecutive outputs of one choice (a client that reads slower than tokens arrive
    gets them in fewer, larger chunks)."""
    merged: dict[int, StepOutput] = {}
    order: list[int] = []
    for i, o in outs:
        m = merged.get(i)
        if m is None:
            merged[i] = StepOutput(o.seq_id, list(o.token_ids), o.text,
                                   list(o.logprobs) if o.logprobs is not None else None, o.prompt_logprobs,
                                   o.finish_reason, o.prompt_tokens, o.completion_tokens, o.error)
            order.append(i)
        else:
            m.token_ids += o.token_ids
            m.text += o.text
            if o.logprobs is not None:
                m.logprobs = (m.logprobs or []) + o.logprobs
            m.prompt_logprobs = m.prompt_logprobs or o.prompt_logprobs
            m.finish_reason, m.error = o.finish_reason, o.error
            m.completion_tokens = o.completion_tokens
    return [(i, merged[i]) for i in order]


async def _collect(request: Request, eng: Engine, choices: _Choices) -> list[_Out]:
    n = len(choices.handles)
    outs = [_Out([], "", [], None, None) for _ in range(n)]
    left = n
    try:
        while left:
            try:
                i, o = await asyncio.wait_for(choices.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ServeError(499, "client disconnected") from None
                continue
            out = outs[i]
            out.token_ids += o.token_ids
            out.text += o.text
            out.logprobs += o.logprobs or []
            if o.prompt_logprobs is not None:
                out.prompt_logprobs = o.prompt_logprobs
            out.completion_tokens = o.completion_tokens
            if o.finish_reason is not None:
                out.finish_reason, out.error = o.finish_reason, o.error
                left -= 1
    finally:
        if left:
            for h in choices.handles:
                eng.scheduler.cancel(h)
    for o in outs:
        if o.finish_reason == "error":
            raise ServeError(500, o.error or "generation failed")
    return outs


def _sse(request: Request, eng: Engine, choices: _Choices, events: AsyncIterator[str]) -> StreamingResponse:
    request.state.streaming = True

    async def body() -> AsyncIterator[str]:
        ended = "client left"
        try:
            async for piece in events:
                yield piece
            ended = "done"
        finally:  # finished, or the client went away: free every slot this request holds
            for h in choices.handles:
                eng.scheduler.cancel(h)
            log.info("%s %s %s 200 prompt=%d completion=%d stream %s %.3fs", request.state.req_id, request.method,
                     request.url.path, choices.prompt_tokens, sum(choices.completion.values()), ended,
                     time.monotonic() - request.state.t0)
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _drain(choices: _Choices) -> AsyncIterator[list[tuple[int, StepOutput]]]:
    """Batches of outputs until every choice has finished."""
    left = len(choices.handles)
    while left:
        batch = [await choices.queue.get()]
        while not choices.queue.empty():
            batch.append(choices.queue.get_nowait())
        left -= sum(1 for _, o in batch if o.finish_reason is not None)
        yield _merge(batch)


def _finish_reason(o: Any) -> str:
    return "length" if o.finish_reason == "length" else "stop"


class _CompletionFormat:
    """Response bodies of /v1/completions."""

    def __init__(self, eng: Engine, req: CompletionRequest, texts: list[str | None], prompts: list[list[int]]):
        self.eng, self.req, self.texts, self.prompts = eng, req, texts, prompts
        self.tok = eng.tokenizer

    def _tokstr(self, i: int) -> str:
        return self.tok.decode([i]) if self.tok is not None else str(i)

    def _prompt_text(self, p: int) -> str:
        t = self.texts[p]
        if t is not None:
            return t
        return self.tok.decode(self.prompts[p], skip_special=self.req.skip_special_tokens) if self.tok else ""

    def logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        for e in entries:
            s = self._tokstr(e.token_id)
            tokens.append(s)
            lps.append(e.logprob)
            if e.logprob is None:
                tops.append(None)
            else:
                top = {self._tokstr(i): v for i, v in e.top}
                top.setdefault(s, e.logprob)  # the chosen token is always listed (up to logprobs + 1 entries)
                tops.append(top)
            offs.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def full(self, rid: str, created: int, model: str, outs: list[_Out]) -> dict:
        n = self.req.n
        items = []
        for idx, o in enumerate(outs):
            p = idx // n
            prefix = self._prompt_text(p) if self.req.echo else ""
            lp = None
            if self.req.logprobs is not None:
                entries = (o.prompt_logprobs or []) + o.logprobs if self.req.echo else o.logprobs
                lp = self.logprobs(entries, 0)
            items.append({"index": idx, "text": prefix + o.text, "logprobs": lp,
                          "finish_reason": _finish_reason(o), "stop_reason": None})
        usage = _usage(self.prompts, outs)
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": items,
                "usage": usage, "system_fingerprint": None}

    async def stream(self, rid: str, created: int, model: str, choices: _Choices) -> AsyncIterator[str]:
        n = self.req.n
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        offsets = [0] * len(choices.handles)
        started = [False] * len(choices.handles)
        done: dict[int, int] = {}

        def chunk(idx: int, text: str, lp: dict | None, reason: str | None) -> str:
            c = {**base, "choices": [{"index": idx, "text": text, "logprobs": lp, "finish_reason": reason,
                                      "stop_reason": None}]}
            if include_usage:
                c["usage"] = None
            return _data(c)

        async for batch in _drain(choices):
            parts = []
            for idx, o in batch:
                if o.finish_reason == "error":
                    parts.append(_data(ServeError(500, o.error or "generation failed").body()))
                    continue
                text, entries = o.text, list(o.logprobs or [])
                if not started[idx]:
                    started[idx] = True
                    if self.req.echo:
                        text = self._prompt_text(idx // n) + text
                        entries = (o.prompt_logprobs or []) + entries
                lp = None
                if self.req.logprobs is not None:
                    lp = self.logprobs(entries, offsets[idx])
                    offsets[idx] += sum(len(s) for s in lp["tokens"])
                reason = _finish_reason(o) if o.finish_reason else None
                if text or reason or (lp and lp["tokens"]):
                    parts.append(chunk(idx, text, lp, reason))
                if reason:
                    done[idx] = o.completion_tokens
            if parts:
                yield "".join(parts)
        if include_usage:
            completion = sum(done.values())
            prompt = sum(len(p) for p in self.prompts)
            yield _data({**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                          "total_tokens": prompt + completion}})
        yield "data: [DONE]\n\n"


def _usage(prompts: list[list[int]], outs: list[_Out]) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _ChatFormat:
    """Response bodies of /v1/chat/completions."""

    def __init__(self, eng: Engine, req: ChatCompletionRequest, ids: list[int]):
        self.eng, self.req, self.ids = eng, req, ids
        self.tok = eng.tokenizer

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(i: int, v: float) -> dict:
            s = self.tok.decode([i])
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                            for e in entries]}

    def full(self, rid: str, created: int, model: str, outs: list[_Out]) -> dict:
        items = [{"index": i, "message": {"role": "assistant", "content": o.text, "refusal": None, "tool_calls": []},
                  "logprobs": self.logprobs(o.logprobs) if self.req.logprobs else None,
                  "finish_reason": _finish_reason(o), "stop_reason": None} for i, o in enumerate(outs)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": items,
                "usage": _usage([self.ids], outs), "system_fingerprint": None}

    async def stream(self, rid: str, created: int, model: str, choices: _Choices) -> AsyncIterator[str]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(idx: int, delta: dict, lp: dict | None, reason: str | None) -> str:
            c = {**base, "choices": [{"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
            if include_usage:
                c["usage"] = None
            return _data(c)

        yield "".join(chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(len(choices.handles)))
        done: dict[int, int] = {}
        async for batch in _drain(choices):
            parts = []
            for idx, o in batch:
                if o.finish_reason == "error":
                    parts.append(_data(ServeError(500, o.error or "generation failed").body()))
                    continue
                lp = self.logprobs(o.logprobs or []) if self.req.logprobs else None
                if o.text or (lp and lp["content"]):
                    parts.append(chunk(idx, {"content": o.text}, lp, None))
                if o.finish_reason:
                    parts.append(chunk(idx, {}, None, _finish_reason(o)))
                    done[idx] = o.completion_tokens
            if parts:
                yield "".join(parts)
        if include_usage:
            completion = sum(done.values())
            yield _data({**base, "choices": [], "usage": {"prompt_tokens": len(self.ids),
                                                          "completion_tokens": completion,
                                                          "total_tokens": len(self.ids) + completion}})
        yield "data: [DONE]\n\n"
