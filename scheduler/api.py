"""The OpenAI HTTP API's bodies: requests in and responses out, as pydantic v2 models that
validate, serialize and describe them.

The HTTP frontend (deepflow.py) turns a body into a `ChatRequest`, `CompletionRequest`,
`CacheRequest` or `ScaleRequest` here (`parse_chat`, ...) before any job exists; the job executors
(scheduler/je.py) read the validated model: messages to template, prompt to tokenize, and
`to_sampling_params` for the engine (flowserve/protocol.py's `SamplingParams`). A bad input becomes
an `APIError` with OpenAI's error body, its `param` the field as the client wrote it
(`messages[1].content[0]`). Going out, `full_response`, `first_chunks`, `chunk` and `usage_chunk`
shape a Job's text as `ChatCompletion`, `ChatCompletionChunk` or `Completion`, and the other routes
answer with the models below them. Both directions' JSON schemas are `GET /openapi.json`
(scheduler/openapi.py). No aiohttp.
"""
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar, Union

import orjson
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, field_validator, model_validator)

from flowserve.grammar import JSON_OBJECT, schema_error
from flowserve.protocol import SamplingParams
from scheduler.tools import CallDelta, ToolPlan

if TYPE_CHECKING:
    from scheduler.job import Job, LogprobEntry

MAX_TOKENS_LIMIT = 1_000_000    # a sanity bound; the frontend checks the context length later
MAX_MESSAGES = 256
MAX_STOP = 16
MAX_TES = 256                   # per group, a bound on /admin/scale
COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions defaults to 16 tokens (OpenAI, vLLM)
DEFAULT_CACHE_TTL_S = 3600      # a context cache lives an hour unless told (as Gemini's)
MAX_CACHE_TTL_S = 7 * 86400
MAX_TOP_LOGPROBS = 20               # chat's top_logprobs (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5         # completions' logprobs (OpenAI's bound)
MAX_TOOLS = 128                     # OpenAI's bound

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

    def body(self) -> "ErrorResponse":
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist.", "model", code="model_not_found")


# --- the models ------------------------------------------------------------------------

def _str_or(text, array):
    """A JSON string (`text`) or an array, told apart by type: an error names the form sent."""
    return Annotated[Union[Annotated[text, Tag("str")], Annotated[array, Tag("list")]],
                     Discriminator(lambda v: "str" if isinstance(v, str) else "list")]


NonEmpty = Annotated[str, Field(min_length=1)]
Metadata = Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]  # OpenAI's limits
TokenId = Annotated[int, Field(ge=0)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Prompt = _str_or(NonEmpty, Annotated[list[TokenId], Field(min_length=1)])  # text or token ids


class _Strict(BaseModel):
    """JSON's types: a bool is no number, "1" no integer, NaN no number; an int is a float."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]           # the only content part supported
    text: str


ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Strict):
    name: ToolName
    arguments: str                  # a JSON object, as text


class ToolCall(_Strict):
    """A call the model made: in an answer's `message.tool_calls`, and in the assistant turns
    a client sends back."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: _str_or(str, list[TextPart]) | None = Field(None, validate_default=True)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)  # a tool result: the call it answers

    @field_validator("content")
    @classmethod
    def _text(cls, content, info) -> str:
        """Text parts joined with newlines (as vLLM); only an assistant turn may have none."""
        if content is None and info.data.get("role") != "assistant":
            raise ValueError("a string or an array of text parts is required")
        return "\n".join(p.text for p in content) if isinstance(content, list) else content or ""

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, calls, info):
        if calls and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool calls")
        for c in calls or ():
            if not isinstance(_json_or_none(c.function.arguments), dict):
                raise ValueError(f"arguments must be a JSON object, got {c.function.arguments!r:.40}")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_result(cls, call_id, info):
        if (call_id is None) == (info.data.get("role") == "tool"):
            raise ValueError("a tool message needs the id of the call it answers" if call_id is None
                             else "only a tool message answers a tool call")
        return call_id


def _json_or_none(text: str):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _as_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as chat templates read them (transformers' shape): role (developer -> system)
    and content, an assistant's tool calls with their arguments as objects, a tool result's call id."""
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": orjson.loads(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


# validated into the {"role", "content"} dicts that chat templates read
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES), AfterValidator(_as_dicts)]


class FunctionDef(_Strict):
    name: ToolName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object (None: no arguments)
    strict: bool | None = None      # arguments always match `parameters` under required or a named choice


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: ToolName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class TextFormat(_Strict):
    type: Literal["text"] = "text"


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchema(_Strict):
    """response_format.json_schema: the schema the answer must match (any of it, `strict` or not:
    the grammar enforces it all), checked here with the grammar library (flowserve/grammar.py)."""
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict = Field({}, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _compiles(self):
        if error := schema_error(self.text):
            raise ValueError(f"the schema cannot be compiled: {error}")
        return self

    @property
    def text(self) -> str:
        return orjson.dumps(self.schema_).decode()


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class _Unsupported(_Strict):
    """Features this server does not implement: accepted at their "off" value only."""
    functions: None = None
    function_call: Literal["none"] = "none"
    suffix: Literal[""] = ""
    best_of: Literal[1] = 1


_OFF = set(_Unsupported.model_fields)


class GenerationRequest(_Unsupported):
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
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 0  # vLLM extension: no EOS or stop token before
    # The logits processors (flowserve/sampler.py): OpenAI's penalties over the generated tokens,
    # vLLM's repetition_penalty over prompt and output, and a bias per token id (a JSON object's keys are strings)
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=2)] = 1.0  # vLLM extension; 1: off; >= 0.01 keeps logits finite
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] = {}
    cache_id: str | None = None                     # a context cache from POST /v1/caches: its context comes first
    response_format: ResponseFormat = TextFormat()  # structured outputs: the answer is JSON (of a schema)

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

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float]) -> dict[int, float]:
        """Keys as token ids (the JE checks them against the vocabulary)."""
        bad = next((k for k in bias if not k.isdecimal()), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids (non-negative integers), got {bad!r:.40}")
        return {int(k): v for k, v in bias.items()}

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per generated token, with its own logprob (None: no logprobs)."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None

    @property
    def json_schema(self) -> str | None:
        """The JSON Schema the answer must match, as text (None: free text)."""
        match self.response_format:
            case JsonObjectFormat():
                return JSON_OBJECT
            case JsonSchemaFormat(json_schema=spec):
                return spec.text
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def ignored_fields(self) -> list[str]:
        return list(self.model_extra or ())

    @property
    def max_new_tokens(self) -> int | None:
        """The newer name (max_completion_tokens) wins; None: up to the context length."""
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """What the engine samples choice `choice` with, `max_tokens` resolved against the context."""
        seed = None if self.seed is None else self.seed + choice  # n choices from one seed must differ
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or -1,  # 0: off, as vLLM
                              seed=seed, max_tokens=max_tokens, stop_token_ids=list(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias),
                              logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs,
                              json_schema=self.json_schema)


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions. Unknown fields are ignored; null means the default."""
    messages: Messages
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0   # with logprobs: alternatives per token
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] = []
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _unique(cls, tools: list[Tool]) -> list[Tool]:
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            raise ValueError("function names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _declared(cls, choice, info):
        names = {t.function.name for t in info.data.get("tools", [])}
        if choice != "none" and not names:
            raise ValueError("only allowed when 'tools' are given")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"no tool named {choice.function.name!r:.70} was declared")
        return choice

    @property
    def num_logprobs(self) -> int | None:
        return self.top_logprobs if self.logprobs else None

    @property
    def tool_plan(self) -> ToolPlan | None:
        """How the tools are used; None ("none", or no tools): not at all, not even shown."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice == "none":
            return None
        functions = [t.function.model_dump(exclude_none=True, exclude={"strict"}) for t in self.tools]
        if isinstance(choice, NamedToolChoice):
            return ToolPlan(functions, "named", choice.function.name, self.parallel_tool_calls)
        return ToolPlan(functions, choice, parallel=self.parallel_tool_calls)

    @property
    def json_schema(self) -> str | None:
        """`required` and a named function: the grammar makes the answer the call(s)."""
        schema = self.tool_plan and self.tool_plan.schema()
        return orjson.dumps(schema).decode() if schema else super().json_schema

    @model_validator(mode="after")
    def _enforceable(self):
        """The calls the grammar enforces: their schemas compile, and are the only constraint."""
        if self.tool_choice in (None, "none", "auto"):
            return self
        if not isinstance(self.response_format, TextFormat):
            raise invalid("response_format cannot be combined with tool_choice 'required' or a named function",
                          "response_format")
        for i, tool in enumerate(self.tools):
            params = tool.function.parameters
            if params is not None and (error := schema_error(orjson.dumps(params).decode())):
                raise invalid(f"the parameters of {tool.function.name!r} cannot be compiled: {error}",
                              f"tools[{i}].function.parameters")
        return self


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: one prompt, as text or token ids (or a batch of one of either).
    Unknown fields are ignored; null means the default."""
    prompt: Prompt
    max_tokens: MaxTokens | None = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None  # alternatives per token
    echo: bool = False              # the prompt comes first in the text (and its tokens in logprobs)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

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
    messages: Messages | None = None
    prompt: Prompt | None = None
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_CACHE_TTL_S)] = DEFAULT_CACHE_TTL_S

    @model_validator(mode="after")
    def _one_context(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either 'messages' (for chat) or 'prompt' (for completions)")
        return self


class ScaleRequest(_Strict):
    """POST /admin/scale: a group's size, set by hand (0 allowed); the autoscaler keeps it."""
    model: str | None = Field(None, exclude_if=lambda v: v is None)  # a base model (default: the first)
    group: str = "colocated"
    instances: Annotated[int, Field(ge=0, le=MAX_TES)]


class LoadLoraRequest(_Strict):
    """POST /v1/load_lora_adapter (vLLM's): register a PEFT adapter directory as a model."""
    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: NonEmpty
    base_model_name: str | None = None   # default: the first base model


class UnloadLoraRequest(_Strict):
    """POST /v1/unload_lora_adapter: requests in flight finish, new ones get 404."""
    lora_name: NonEmpty


Auto = Literal["auto"]


class Hyperparameters(_Strict):
    """A fine-tuning job's: OpenAI's three ("auto": scheduler/fine_tuning.py picks), then LoRA's."""
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Auto = "auto"
    lora_rank: Annotated[int, Field(ge=1, le=256)] = 8
    lora_alpha: Annotated[float, Field(gt=0, le=4096)] = 16
    checkpoint_steps: Annotated[int, Field(ge=1)] = 10


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Hyperparameters()


class FineTuningMethod(_Strict):
    type: Literal["supervised"]     # trained as a LoRA adapter; dpo and reinforcement are not offered
    supervised: Supervised = Supervised()


class FineTuningRequest(_Strict):
    """POST /v1/fine_tuning/jobs: `hyperparameters` at the top (OpenAI's older form) or in `method`."""
    model: NonEmpty
    training_file: NonEmpty
    metadata: Metadata | None = None
    validation_file: NonEmpty | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    hyperparameters: Hyperparameters | None = None
    method: FineTuningMethod | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None

    @property
    def params(self) -> Hyperparameters:
        return self.hyperparameters or (self.method.supervised.hyperparameters if self.method else Hyperparameters())


class TrainingMessage(ChatMessage):
    weight: Literal[0, 1] = 1       # an assistant message with 0 is context, not learned


class TrainingExample(_Strict):
    """One line of a fine-tuning file (OpenAI's chat format)."""
    messages: Annotated[list[TrainingMessage], Field(min_length=2, max_length=MAX_MESSAGES)]

    @model_validator(mode="after")
    def _learns_something(self):
        if not any(m.role == "assistant" and m.weight for m in self.messages):
            raise ValueError("an example needs an assistant message to learn from")
        return self

    def as_dicts(self) -> list[dict]:
        return [{**d, "weight": m.weight} for d, m in zip(_as_dicts(self.messages), self.messages)]


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class BatchRequest(_Strict):
    """POST /v1/batches: run every line of an uploaded JSONL file (purpose batch) against `endpoint`."""
    input_file_id: NonEmpty
    endpoint: Literal[BATCH_ENDPOINTS]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None


# --- parsing ---------------------------------------------------------------------------

Model = TypeVar("Model", bound=BaseModel)
_DEPTH = {"messages": 4, "stream_options": 2, "tools": 4, "hyperparameters": 2, "method": 4}  # how deep a param goes: messages[1].content[0]


def _api_error(e: ValidationError, model: type[BaseModel]) -> APIError:
    """pydantic's first error as OpenAI's 400, its `loc` as the param the client knows."""
    err = e.errors(include_url=False)[0]
    if not err["loc"]:  # a rule over the whole body
        return invalid(f"{err['msg'].removeprefix('Value error, ')}.")
    loc = [x for x in err["loc"] if x not in ("str", "list")][:_DEPTH.get(err["loc"][0], 1)]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    name = [x for x in loc if isinstance(x, str)][-1]
    if name in _OFF and issubclass(model, _Unsupported):  # a fine-tuning `suffix` is supported
        return invalid(f"{name} is not supported by this server.", param)
    got = f", got {err['input']!r:.40}" if isinstance(err["input"], (str, int, float)) else ""
    return invalid(f"Invalid '{param}': {err['msg'].removeprefix('Value error, ')}{got}.", param)


def parse(model: type[Model], body: object) -> Model:
    """`body` validated as `model`, or the 400 that says what is wrong with it."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e, model) from None


parse_chat: Callable[[object], ChatRequest] = partial(parse, ChatRequest)
parse_completion: Callable[[object], CompletionRequest] = partial(parse, CompletionRequest)
parse_scale: Callable[[object], ScaleRequest] = partial(parse, ScaleRequest)
parse_training_example: Callable[[object], TrainingExample] = partial(parse, TrainingExample)


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
# Serialized field by field as OpenAI does: `logprobs` is always there (null); a stream
# delta and a chunk's `usage` only when they hold something.

def _omitted_when_none():
    return Field(None, exclude_if=lambda v: v is None)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the answer of every error status (`APIError.body`)."""
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None             # None: only tool calls
    tool_calls: list[ToolCall] | None = _omitted_when_none()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None         # the token's UTF-8 bytes


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at its position, best first


class ChatLogprobs(BaseModel):
    """A chat choice's (or chunk's) `logprobs`: one entry per generated token."""
    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """A completion's `logprobs`, the legacy shape: per token its text, logprob, the top ones
    as {text: logprob}, and its offset in the choice's text (with echo the prompt's first,
    whose first token has null logprobs)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


def chat_logprobs(entries: "list[LogprobEntry] | None") -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
        top_logprobs=[TopLogprob(token=t, logprob=x, bytes=list(t.encode())) for t, x in e.top]) for e in entries])


def completion_logprobs(entries: "list[LogprobEntry] | None") -> CompletionLogprobs | None:
    if entries is None:
        return None
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[None if e.top is None else dict(e.top) for e in entries],
                              text_offset=[e.offset for e in entries])


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class _Generated(BaseModel):
    """What every completion body and chunk starts with."""
    id: str
    object: str
    created: int
    model: str


class ChatCompletion(_Generated):
    """POST /v1/chat/completions, the whole answer."""
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = _omitted_when_none()
    arguments: str


class ToolCallDelta(BaseModel):
    """A tool call's fragment in a stream: the first has its id, type and name, then arguments
    follow piece by piece (clients join them by `index`)."""
    index: int
    id: str | None = _omitted_when_none()
    type: Literal["function"] | None = _omitted_when_none()
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_when_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Generated):
    """One server-sent event of a chat stream; every chunk of a stream has the same `id`."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_when_none()


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Generated):
    """POST /v1/completions: the whole answer (with `usage`), or one event of its stream."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_when_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepflow"
    root: str                       # its weights: a base's model file, an adapter's directory
    parent: str | None = None       # an adapter's base model (vLLM's field)
    max_model_len: int


class ModelDeleted(BaseModel):
    """POST /v1/unload_lora_adapter, DELETE /v1/models/{model}."""
    id: str
    object: Literal["model.deleted"] = "model.deleted"
    deleted: bool = True


class ModelList(BaseModel):
    """GET /v1/models."""
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ContextCacheInfo(BaseModel):
    """A context cache (POST and GET /v1/caches/...)."""
    id: str
    object: Literal["context_cache"] = "context_cache"
    model: str
    kind: Literal["chat", "completion"]
    tokens: int
    created: int
    expires_at: int


class ContextCacheList(BaseModel):
    """GET /v1/caches."""
    object: Literal["list"] = "list"
    data: list[ContextCacheInfo]


class ContextCacheDeleted(BaseModel):
    id: str
    object: Literal["context_cache.deleted"] = "context_cache.deleted"
    deleted: bool = True


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """A fine-tuning job (OpenAI's `fine_tuning.job`)."""
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str = "org-deepflow"
    result_files: list[str] = []
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None
    hyperparameters: dict
    trained_tokens: int | None
    error: FineTuningError | None
    seed: int
    suffix: str | None
    estimated_finish: int | None = None
    integrations: list = []
    method: dict
    metadata: dict[str, str] | None = None


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict | None


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningEventList(FineTuningJobList):
    data: list[FineTuningEvent]


class FineTuningCheckpointList(FineTuningJobList):
    data: list[FineTuningCheckpoint]


class FileObject(BaseModel):
    """An uploaded file (POST and GET /v1/files/...)."""
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    """GET /v1/files."""
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    """A batch (POST /v1/batches, GET /v1/batches/...): OpenAI's statuses and times (Unix seconds, null: not yet)."""
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    """GET /v1/batches."""
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Health(BaseModel):
    """GET /health: 200 with ok, 503 with degraded."""
    status: Literal["ok", "degraded"]
    tes_ready: int


def _head(job: "Job") -> dict:
    return {"id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id, "created": int(job.created),
            "model": job.model}


def first_chunks(job: "Job") -> list[ChatCompletionChunk]:
    """Chat streams open with one role-only chunk per choice."""
    if job.kind != "chat":
        return []
    return [ChatCompletionChunk(**_head(job), choices=[
        ChatChunkChoice(index=t.index, delta=ChatDelta(role="assistant", content=""))]) for t in job.tasks]


def chunk(job: "Job", index: int, text: str, finish: str | None,
          logprobs: "list[LogprobEntry] | None" = None, call: CallDelta | None = None) -> ChatCompletionChunk | Completion:
    """A choice's new text or tool call fragment and its tokens' logprobs (if asked), or (with
    `finish`) its end."""
    if job.kind == "chat":
        delta = ChatDelta(content=None if finish or (call and not text) else text, tool_calls=call and [ToolCallDelta(
            index=call.index, id=call.id, type=call.id and "function",
            function=FunctionDelta(name=call.name, arguments=call.arguments))])
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=chat_logprobs(logprobs), finish_reason=finish)
        return ChatCompletionChunk(**_head(job), choices=[choice])
    return Completion(**_head(job), choices=[CompletionChoice(index=index, text="" if finish else text,
                                                              logprobs=completion_logprobs(logprobs),
                                                              finish_reason=finish)])


def usage_chunk(job: "Job", usage: dict) -> ChatCompletionChunk | Completion:
    return (ChatCompletionChunk if job.kind == "chat" else Completion)(**_head(job), choices=[], usage=usage)


def _message(text: str, fragments: list[CallDelta]) -> AssistantMessage:
    """A chat choice's answer: its text, and the tool calls its fragments make up."""
    calls: dict[int, ToolCall] = {}
    for d in fragments:
        if d.id:
            calls[d.index] = ToolCall(id=d.id, function=FunctionCall(name=d.name, arguments=""))
        calls[d.index].function.arguments += d.arguments
    return AssistantMessage(content=text or None, tool_calls=list(calls.values())) if calls else AssistantMessage(content=text)


def full_response(job: "Job", texts: list[str], finishes: list[str], usage: dict,
                  logprobs: "list[list[LogprobEntry] | None] | None" = None,
                  calls: list[list[CallDelta]] | None = None) -> ChatCompletion | Completion:
    """Every choice's text, finish reason, logprobs (None where not asked) and tool calls."""
    logprobs, calls = logprobs or [None] * len(texts), calls or [[]] * len(texts)
    if job.kind == "chat":
        return ChatCompletion(**_head(job), usage=usage, choices=[
            ChatChoice(index=i, message=_message(t, c), logprobs=chat_logprobs(lp), finish_reason=f)
            for i, (t, f, lp, c) in enumerate(zip(texts, finishes, logprobs, calls))])
    return Completion(**_head(job), usage=usage, choices=[
        CompletionChoice(index=i, text=t, logprobs=completion_logprobs(lp), finish_reason=f)
        for i, (t, f, lp) in enumerate(zip(texts, finishes, logprobs))])
