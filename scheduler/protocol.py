"""OpenAI-compatible request parsing and validation.

The HTTP frontend turns a request body into a `ChatRequest` or `CompletionRequest` here,
before any job exists; the job executors (JEs) read the typed result (messages to template,
prompt to tokenize, `SamplingOptions` for the engine). Every bad input becomes an `APIError`
carrying the HTTP status and OpenAI's error body, so clients see the errors they expect.
Pure Python: no aiohttp, so it is cheap to test and to reuse (batch files, the CLI).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_TOKENS_LIMIT = 1_000_000    # a sanity bound; the frontend checks the context length later
MAX_MESSAGES = 256
MAX_STOP = 16
COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions defaults to 16 tokens (OpenAI, vLLM)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# OpenAI's error type and default code for each status we answer with.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
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
    return APIError(404, f"The model '{model}' does not exist.", "model")


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


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}]
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    ignored_fields: list[str] = field(default_factory=list)


@dataclass
class CompletionRequest:
    model: str | None
    prompt: str | list[int]         # text, or token ids
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    ignored_fields: list[str] = field(default_factory=list)


# --- the table-driven checks -------------------------------------------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
               list: "an array", dict: "an object", type(None): "null"}


def _is(v: Any, kind: type) -> bool:
    if isinstance(v, bool):             # bool is an int in Python, but not a number in JSON
        return kind is bool
    return isinstance(v, (int, float) if kind is float else kind)   # an int is a valid float


def _get(obj: dict, key: str, kind: type, default: Any = None,
         ok: Callable[[Any], bool] | None = None, need: str = "", param: str | None = None):
    """obj[key] checked to be of `kind` and to pass `ok`; null or absent gives `default`."""
    param, v = param or key, obj.get(key)
    if v is None:
        return default
    if not _is(v, kind):
        got = _TYPE_NAMES.get(type(v), type(v).__name__)
        raise invalid(f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, "
                      f"but got {got} instead.", param)
    if kind is float and not math.isfinite(v):
        raise invalid(f"Invalid value for '{param}': must be a finite number.", param)
    if ok is not None and not ok(v):
        raise invalid(f"Invalid value for '{param}': must be {need}, got {v!r}.", param)
    return float(v) if kind is float else v


_max_tok = (int, None, lambda v: 1 <= v <= MAX_TOKENS_LIMIT, f"between 1 and {MAX_TOKENS_LIMIT}")
# The fields both endpoints share: name -> (type, default, check, what the check asks for).
_FIELDS: dict[str, tuple] = {
    "model": (str, None, None, ""),
    "max_tokens": _max_tok,
    "max_completion_tokens": _max_tok,
    "temperature": (float, 1.0, lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (float, 1.0, lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "top_k": (int, -1, lambda v: v >= -1, "-1 (disabled) or a positive integer"),
    "n": (int, 1, lambda v: 1 <= v <= 16, "between 1 and 16"),
    "seed": (int, None, lambda v: -2**63 <= v < 2**63, "a signed 64-bit integer"),
    "stop": (list, [], lambda v: len(v) <= MAX_STOP and all(isinstance(s, str) and s for s in v),
             f"a non-empty string or an array of at most {MAX_STOP} non-empty strings"),
    "stream": (bool, False, None, ""),
    "stream_options": (dict, None, None, ""),
    "user": (str, None, None, ""),
    "ignore_eos": (bool, False, None, ""),                                  # vLLM extension
    "stop_token_ids": (list, [], lambda v: all(_is(i, int) and i >= 0 for i in v),
                       "an array of non-negative integers"),                # vLLM extension
}


def _zero(v: Any) -> bool:
    return _is(v, float) and v == 0


# Features we do not implement: accepted only at their "off" value (null always is).
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "logprobs": lambda v: v is False,
    "top_logprobs": _zero,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: False,
    "function_call": lambda v: v == "none",
    "response_format": lambda v: isinstance(v, dict) and v.get("type", "text") == "text",
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: _is(v, int) and v == 1,
}


def _common(body: object, own: str) -> dict:
    """The checks both endpoints share, returned as the requests' common fields.
    `own` is the endpoint's input field (messages or prompt), not reported as ignored."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object.")
    for key, off in _UNSUPPORTED.items():
        if body.get(key) is not None and not off(body[key]):
            raise invalid(f"{key} is not supported by this server.", key)
    if isinstance(body.get("stop"), str):       # a single stop string is a list of one
        body = {**body, "stop": [body["stop"]]}
    v = {key: _get(body, key, *rule) for key, rule in _FIELDS.items()}
    so = v["stream_options"]
    if so is not None and not v["stream"]:      # as OpenAI: only for streaming calls
        raise invalid("'stream_options' is only allowed when 'stream' is true.",
                      "stream_options")
    mct = v["max_completion_tokens"]            # the newer name wins
    opts = SamplingOptions(
        max_tokens=mct if mct is not None else v["max_tokens"],
        temperature=v["temperature"], top_p=v["top_p"],
        top_k=v["top_k"] if v["top_k"] != 0 else -1,    # 0 means "off", as in vLLM
        n=v["n"], seed=v["seed"], stop=list(v["stop"]),
        stop_token_ids=list(v["stop_token_ids"]), ignore_eos=v["ignore_eos"])
    usage = _get(so or {}, "include_usage", bool, False, param="stream_options.include_usage")
    ignored = [k for k in body if k not in _FIELDS and k not in _UNSUPPORTED and k != own]
    return {"model": v["model"], "options": opts, "stream": v["stream"], "user": v["user"],
            "include_usage": usage, "ignored_fields": ignored}


def _content(msg: dict, i: int, role: str) -> str:
    """A message's content as one string; text parts are joined with newlines (as vLLM)."""
    param = f"messages[{i}].content"
    c = msg.get("content")
    if c is None and role == "assistant":       # e.g. a turn that only held tool calls
        return ""
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise invalid(f"'{param}' must be a string or an array of text parts.", param)
    texts = []
    for j, part in enumerate(c):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"'{param}[{j}]' must be a text part; content type {kind!r} "
                          "is not supported.", f"{param}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_chat(body: object) -> ChatRequest:
    """Validate a /v1/chat/completions body."""
    common = _common(body, "messages")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("'messages' is required and must be a non-empty array.", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise invalid(f"'messages' holds {len(msgs)} messages; at most {MAX_MESSAGES}.",
                      "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise invalid(f"'messages[{i}]' must be an object.", f"messages[{i}]")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise invalid(f"'messages[{i}].role' must be one of system, developer, user, "
                          f"assistant; got {m.get('role')!r}.", f"messages[{i}].role")
        if m.get("tool_calls"):
            raise invalid("tool calls are not supported by this server.",
                          f"messages[{i}].tool_calls")
        messages.append({"role": role, "content": _content(m, i, role)})
    return ChatRequest(messages=messages, **common)


def parse_completion(body: object) -> CompletionRequest:
    """Validate a /v1/completions body: one prompt, as text or as token ids."""
    common = _common(body, "prompt")
    if common["options"].max_tokens is None:
        common["options"].max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    p = body.get("prompt")
    # A batch of one (["text"] or [[ids]]) is unwrapped; larger batches are refused.
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) > 1:
            raise invalid("batched prompts are not supported; send one prompt per request.",
                          "prompt")
        p = p[0]
    if not isinstance(p, str) and not (
            isinstance(p, list) and all(_is(t, int) and t >= 0 for t in p)):
        raise invalid("'prompt' is required and must be a string or an array of token ids.",
                      "prompt")
    if not p:                                   # the engine needs at least one token
        raise invalid("'prompt' must not be empty.", "prompt")
    return CompletionRequest(prompt=p, **common)


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
