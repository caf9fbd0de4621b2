"""Request schemas of the OpenAI-compatible API (field names and ranges as OpenAI's reference and
vLLM define them), their translation into the scheduler's `GenerationRequest`, and the error body.
Requests are validated strictly: "5" is not an integer. A field this server does not know is
accepted and ignored, as OpenAI does (`unknown_fields` names them, so the server can log them)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmforge.infer.scheduler import GenerationRequest

StrictModel = ConfigDict(strict=True, extra="allow")  # extras are kept only to be named in the log


def unknown_fields(request: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields of `request` (and of the objects in it) that no schema declares,
    e.g. ["user_metadata", "messages[].tool_call_id"]."""
    names = [prefix + name for name in (request.model_extra or {})]
    for name in type(request).model_fields:
        value = getattr(request, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                names += unknown_fields(item, f"{prefix}{name}{'[]' if isinstance(value, list) else ''}.")
    return list(dict.fromkeys(names))


class ServeError(Exception):
    """An error the server answers with `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
             500: "internal_server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else {401: "invalid_api_key", 404: "model_not_found",
                                                   429: "queue_full", 503: "model_loading"}.get(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> ServeError:
    """The first problem of a pydantic error as one line naming the field."""
    err = e.errors(include_url=False)[0]
    if err.get("type") == "json_invalid":
        return ServeError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    # union members add their type name to the location; keep only the field path
    loc = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    field = ".".join(loc) or None
    if err.get("type") == "model_type" and not loc:
        return ServeError(400, "the request body must be a JSON object")
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return ServeError(400, f"'{field}' is a required field", param=field)
    return ServeError(400, f"invalid value for '{field}': {msg}", param=field)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "list[str]", "list[int]", "list[list[int]]",
              "function-after", "constrained-int", "constrained-float"}


class StreamOptions(BaseModel):
    model_config = StrictModel
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share."""

    model_config = StrictModel
    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None
    # vLLM's common extras
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: Optional[dict[str, float]] = None
    # structured output: OpenAI's response_format, or vLLM's guided_* (at most one)
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None

    def sampling_request(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None = None, adapter: str | None = None) -> GenerationRequest:
        """The scheduler request these fields ask for, without a prompt: the engine makes one per
        (prompt, sample) from it. `adapter`: the LoRA adapter `model` names (None: the base)."""
        bias = None
        if self.logit_bias:  # OpenAI's keys are token ids as strings
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ServeError(400, "logit_bias keys must be token ids (integers as strings), got "
                                      f"{', '.join(repr(k) for k in self.logit_bias)}", param="logit_bias") from None
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer
            raise ServeError(400, "stream_options is only allowed when stream is true", param="stream_options")
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return GenerationRequest(
            [], max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=None if self.top_p in (None, 1.0) else self.top_p,
            top_k=None if self.top_k in (None, -1, 0) else self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, seed=self.seed, stop=stop,
            stop_token_ids=list(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens, adapter=adapter)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None


class TextPart(BaseModel):
    model_config = StrictModel
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = StrictModel
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCallItem(BaseModel):
    model_config = StrictModel
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallItem]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template reads it (tool calls and tool_call_id when present)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            if self.content is None:
                m["content"] = None
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionSpec(BaseModel):
    model_config = StrictModel
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolSpec(BaseModel):
    model_config = StrictModel
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = StrictModel
    name: str


class NamedToolChoice(BaseModel):
    model_config = StrictModel
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    def check_tools(self) -> None:
        """400s naming the field for what OpenAI refuses: a tool_choice without tools or naming an
        unknown function, a tool message that answers no earlier call; and for what this server
        cannot do yet: forcing a call needs constrained decoding."""
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ServeError(400, f"tools has two functions named '{dup}'", param="tools")
        choice = self.tool_choice
        if choice is not None and not names:
            raise ServeError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ServeError(400, f"tool_choice names the function '{choice.function.name}', which is not among the "
                                  f"tools ({', '.join(names)})", param="tool_choice")
        if self.forced_tool_choice() is not None:
            asked = next((f for f in ("response_format", "guided_json", "guided_regex", "guided_choice")
                          if getattr(self, f) is not None and not (f == "response_format" and
                                                                    getattr(self, f).get("type") == "text")), None)
            if asked is not None:
                raise ServeError(400, f"tool_choice '{self.tool_choice if isinstance(self.tool_choice, str) else 'function'}' "
                                      f"constrains the reply to tool calls; it cannot be combined with {asked}",
                                 param=asked)
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            if m.role == "assistant" and m.tool_calls:
                calls.update(c.id for c in m.tool_calls)
            elif m.role == "tool":
                if m.tool_call_id is None:
                    raise ServeError(400, f"messages[{i}] is a tool message without 'tool_call_id'",
                                     param=f"messages.[{i}].tool_call_id")
                if m.tool_call_id not in calls:
                    raise ServeError(400, f"messages[{i}].tool_call_id '{m.tool_call_id}' answers no tool call of an "
                                          "earlier assistant message", param=f"messages.[{i}].tool_call_id")

    def forced_tool_choice(self) -> Any:
        """tool_choice when it forces a call ("required", or a named function as a dict), else None."""
        if self.tool_choice == "required":
            return "required"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows the model: none with tool_choice "none" (it will not call them)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class TokenizeRequest(BaseModel):
    model_config = StrictModel
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = StrictModel
    model: Optional[str] = None
    tokens: list[int]
