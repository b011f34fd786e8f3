"""The OpenAI wire format: request bodies in (pydantic v2 models that validate and describe
them), response bodies and SSE chunks out.

The HTTP frontend (deepflow.py) turns a body into a `ChatRequest`, `CompletionRequest` or
`CacheRequest` or `ScaleRequest` here (`parse_chat`, ...) before any job exists; the job executors
(scheduler/je.py) read the validated model: messages to template, prompt to tokenize,
`options` (`SamplingOptions`) for the engine. A bad input becomes an `APIError` with OpenAI's
error body, its `param` the field as the client wrote it (`messages[1].content[0]`). The
models' JSON schemas are the bodies in `GET /openapi.json` (scheduler/openapi.py). Going out,
`full_response`, `first_chunks`, `chunk` and `usage_chunk` shape a Job's text as OpenAI's
`chat.completion` / `text_completion` bodies and stream chunks. No aiohttp.
"""
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Literal, Union

import orjson
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, field_validator, model_validator)

if TYPE_CHECKING:
    from scheduler.job import Job

MAX_TOKENS_LIMIT = 1_000_000    # a sanity bound; the frontend checks the context length later
MAX_MESSAGES = 256
MAX_STOP = 16
MAX_TES = 256                   # per group, a bound on /admin/scale
COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions defaults to 16 tokens (OpenAI, vLLM)
DEFAULT_CACHE_TTL_S = 3600      # a context cache lives an hour unless told (as Gemini's)
MAX_CACHE_TTL_S = 7 * 86400

# OpenAI's error type and default code for each status we answer with.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    507: ("server_error", "insufficient_storage"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


class APIError(Exception):
    """An error the client sees: an HTTP status plus OpenAI's `{"error": {...}}` body.
    `type` and `code` default from the status, e.g. APIError(401, "Incorrect API key")."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | None = None):
        super().__init__(message)
        kind, default_code = ERROR_KINDS.get(
            status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.status, self.message, self.param = status, message, param
        self.type, self.code = type or kind, code or default_code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist.", "model", code="model_not_found")


@dataclass
class SamplingOptions:
    max_tokens: int | None = None   # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: disabled
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


# --- the models ------------------------------------------------------------------------

def _str_or(text, array):
    """A JSON string (`text`) or an array, told apart by type: an error names the form sent."""
    return Annotated[Union[Annotated[text, Tag("str")], Annotated[array, Tag("list")]],
                     Discriminator(lambda v: "str" if isinstance(v, str) else "list")]


NonEmpty = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class _Strict(BaseModel):
    """JSON's types: a bool is no number, "1" no integer, NaN no number; an int is a float."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]           # the only content part supported
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: _str_or(str, list[TextPart]) | None = Field(None, validate_default=True)
    tool_calls: Annotated[list, Field(max_length=0)] | None = None     # not supported

    @field_validator("content")
    @classmethod
    def _text(cls, content, info) -> str:
        """Text parts joined with newlines (as vLLM); only an assistant turn may have none."""
        if content is None and info.data.get("role") != "assistant":
            raise ValueError("a string or an array of text parts is required")
        return "\n".join(p.text for p in content) if isinstance(content, list) else content or ""


def _as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as chat templates read them: {"role", "content"}, developer -> system."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"] = "text"


class _Unsupported(_Strict):
    """Features this server does not implement: accepted at their "off" value only."""
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] = False
    top_logprobs: Literal[0] = 0
    logit_bias: Annotated[dict, Field(max_length=0)] = {}
    tools: Annotated[list, Field(max_length=0)] = []
    tool_choice: Literal["none"] = "none"
    functions: None = None
    function_call: Literal["none"] = "none"
    response_format: TextFormat = TextFormat()
    echo: Literal[False] = False
    suffix: Literal[""] = ""
    best_of: Literal[1] = 1


_OFF = {*_Unsupported.model_fields, "tool_calls"}


class _Request(_Unsupported):
    """What both endpoints accept. null means the default, as absent does; unknown fields
    are kept aside (`ignored_fields`, which the caller logs)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: MaxTokens | None = None             # None: up to the context length
    max_completion_tokens: MaxTokens | None = None  # the newer name; it wins
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1        # -1 or 0: disabled
    n: Annotated[int, Field(ge=1, le=16)] = 1
    seed: Annotated[int, Field(ge=-2**63, lt=2**63)] | None = None
    stop: _str_or(NonEmpty, Annotated[list[NonEmpty], Field(max_length=MAX_STOP)]) = []
    stream: bool = False
    stream_options: StreamOptions | None = None     # only with stream=true, as OpenAI
    user: str | None = None
    ignore_eos: bool = False                        # vLLM extension
    stop_token_ids: list[TokenId] = []              # vLLM extension
    cache_id: str | None = None                     # a context cache from POST /v1/caches: its context comes first

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body):
        return {k: v for k, v in body.items() if v is not None or k not in cls.model_fields}

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, options, info):
        if not info.data.get("stream"):
            raise ValueError("only allowed when 'stream' is true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def ignored_fields(self) -> list[str]:
        return list(self.model_extra or ())

    @cached_property
    def options(self) -> SamplingOptions:
        mct = self.max_completion_tokens
        return SamplingOptions(
            max_tokens=self.max_tokens if mct is None else mct, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k or -1, n=self.n, seed=self.seed,  # top_k 0: off, as vLLM
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos)


class ChatRequest(_Request):
    """POST /v1/chat/completions. Unknown fields are ignored; null means the default."""
    # validated into the {"role", "content"} dicts that chat templates read
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES),
                        AfterValidator(_as_dicts)]


class CompletionRequest(_Request):
    """POST /v1/completions: one prompt, as text or token ids (or a batch of one of either).
    Unknown fields are ignored; null means the default."""
    prompt: _str_or(NonEmpty, Annotated[list[TokenId], Field(min_length=1)])
    max_tokens: MaxTokens | None = COMPLETION_DEFAULT_MAX_TOKENS

    @field_validator("prompt", mode="before")
    @classmethod
    def _batch_of_one(cls, prompt):
        """A batch of one (["text"] or [[ids]]) is unwrapped; larger batches are refused."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            return prompt[0]
        return prompt


class CacheRequest(_Strict):
    """POST /v1/caches: a context to keep computed, chat `messages` or a completion `prompt`;
    requests name it by the id in the answer (`cache_id`)."""
    model: str | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES),
                        AfterValidator(_as_dicts)] | None = None
    prompt: _str_or(NonEmpty, Annotated[list[TokenId], Field(min_length=1)]) | None = None
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_CACHE_TTL_S)] = DEFAULT_CACHE_TTL_S

    @model_validator(mode="after")
    def _one_context(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either 'messages' (for chat) or 'prompt' (for completions)")
        return self


class ScaleRequest(_Strict):
    """POST /admin/scale: a group's size, set by hand (0 allowed); the autoscaler keeps it."""
    group: str = "colocated"
    instances: Annotated[int, Field(ge=0, le=MAX_TES)]


# --- parsing ---------------------------------------------------------------------------

_DEPTH = {"messages": 4, "stream_options": 2}   # how deep a param goes: messages[1].content[0]


def _api_error(e: ValidationError) -> APIError:
    """pydantic's first error as OpenAI's 400, its `loc` as the param the client knows."""
    err = e.errors(include_url=False)[0]
    if not err["loc"]:  # a rule over the whole body
        return invalid(f"{err['msg'].removeprefix('Value error, ')}.")
    loc = [x for x in err["loc"] if x not in ("str", "list")][:_DEPTH.get(err["loc"][0], 1)]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    name = [x for x in loc if isinstance(x, str)][-1]
    if name in _OFF:
        return invalid(f"{name} is not supported by this server.", param)
    got = f", got {err['input']!r:.40}" if isinstance(err["input"], (str, int, float)) else ""
    return invalid(f"Invalid '{param}': {err['msg'].removeprefix('Value error, ')}{got}.", param)


def _parse(model: type[BaseModel], body: object):
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e) from None


def parse_chat(body: object) -> ChatRequest:
    """Validate a /v1/chat/completions body."""
    return _parse(ChatRequest, body)


def parse_completion(body: object) -> CompletionRequest:
    """Validate a /v1/completions body."""
    return _parse(CompletionRequest, body)


def parse_cache(body: object) -> CacheRequest:
    """Validate a POST /v1/caches body."""
    return _parse(CacheRequest, body)


def parse_scale(body: object) -> ScaleRequest:
    """Validate a POST /admin/scale body."""
    return _parse(ScaleRequest, body)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise invalid("Request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("Request body is not valid UTF-8.") from None
        raise invalid(f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object.")
    return body


# --- responses -------------------------------------------------------------------------

def _choice(kind: str, index: int, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict:
    if kind == "completion":
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if stream:
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish}


def _envelope(job: "Job", stream: bool, choices: list[dict]) -> dict:
    obj = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
           ("completion", False): "text_completion", ("completion", True): "text_completion"}[job.kind, stream]
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return {"id": prefix + job.id, "object": obj, "created": int(job.created), "model": job.model,
            "choices": choices}


def first_chunks(job: "Job") -> list[dict]:
    """Chat streams open with one role-only chunk per choice."""
    if job.kind != "chat":
        return []
    return [_envelope(job, True, [_choice("chat", t.index, None, None, True, first=True)]) for t in job.tasks]


def chunk(job: "Job", index: int, text: str, finish: str | None) -> dict:
    return _envelope(job, True, [_choice(job.kind, index, None if finish else text, finish, True)])


def usage_chunk(job: "Job", usage: dict) -> dict:
    return {**_envelope(job, True, []), "usage": usage}


def full_response(job: "Job", texts: list[str], finishes: list[str], usage: dict) -> dict:
    choices = [_choice(job.kind, i, texts[i], finishes[i], False) for i in range(len(texts))]
    return {**_envelope(job, False, choices), "usage": usage}
