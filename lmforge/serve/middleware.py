"""HTTP around the routes: `Guard`, the ASGI middleware every request passes (API key, one log line,
request metrics, a JSON 500 for a bug), request bodies read under a size limit, and error
responses in OpenAI's shape."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import ServeError, validation_error

log = logging.getLogger("lmforge.serve")

OPEN_PATHS = {"/", "/health", "/metrics", "/favicon.ico"}  # no API key needed


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The request body validated as `model`; 413 past `limit` bytes (read no further), 400 when it
    is empty, not JSON or invalid."""
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


class Guard:
    """Plain ASGI middleware (BaseHTTPMiddleware would add a queue hop to every stream chunk): the
    API key, one log line per request, request metrics by route (`routes`; any other path counts as
    "other"), and a JSON 500 for a bug. It puts t0, req_id, info (for the log line) and streaming
    (a stream logs its own line when it ends) into the request's state."""

    def __init__(self, app: Callable, api_key: str | None, metrics: Metrics, routes: frozenset[str]):
        self.app, self.api_key, self.metrics, self.routes = app, api_key, metrics, routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
            if self.api_key is not None and path not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                scheme, _, key = given.partition(" ")
                good = secrets.compare_digest(key.strip().encode(), self.api_key.encode())
                if scheme.lower() != "bearer" or not good:
                    raise ServeError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.")
            await self.app(scope, receive, send_status)
        except Exception as e:
            if not isinstance(e, ServeError):  # a bug; never a bare 500 page
                log.exception("unhandled error on %s", path)
                e = ServeError(500, f"internal error: {type(e).__name__}")
            if status[0] == 0:
                try:
                    await error_response(e)(scope, receive, send_status)
                except OSError:  # the client is gone (499): nobody to answer
                    status[0] = e.status
        route = path if path in self.routes else "other"
        self.metrics.requests.labels(route, str(status[0])).inc()
        if not st["streaming"]:
            log.info("%s %s %s %d %s%.3fs", st["req_id"], method, path, status[0], st["info"], time.monotonic() - t0)
