"""The OpenAPI 3 description of the HTTP API, served at `GET /openapi.json`.

It states what `scheduler/protocol.py` accepts (types, ranges, the limits on n, stop and
messages) and what every route answers, including the OpenAI error body. Clients and
fuzzers (tests/test_reliability.py runs schemathesis against it) read it from the server,
so the context length in it is the served one.
"""
from scheduler.protocol import MAX_MESSAGES, MAX_STOP, MAX_TOKENS_LIMIT

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1}}]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
    "ignore_eos": {"type": "boolean", "description": "vLLM extension"},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0},
                       "description": "vLLM extension"},
}

_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": "error", **_json({"$ref": "#/components/schemas/Error"})} for s in statuses}


def _generate(description: str, own: dict, required: str) -> dict:
    body = {"type": "object", "required": [required], "properties": {**_SAMPLING, **own}}
    ok = {"description": "a completion (JSON), or with stream=true server-sent events ending in [DONE]",
          "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}}
    return {"post": {"summary": description, "requestBody": {"required": True, **_json(body)},
                     "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 503)}}}


def _get(description: str) -> dict:
    return {"get": {"summary": description, "responses": {"200": {"description": "ok", **_json({"type": "object"})},
                                                          **_errors(401)}}}


def openapi(model_name: str, max_model_len: int) -> dict:
    chat_own = {"messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": _MESSAGE}}
    prompt_own = {"prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                       {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "DeepFlow-py", "version": "0.1",
                 "description": f"OpenAI-compatible serving of {model_name}; context {max_model_len} tokens."},
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/chat/completions": _generate("chat completion", chat_own, "messages"),
            "/v1/completions": _generate("text completion", prompt_own, "prompt"),
            "/v1/models": _get("the served model"),
            "/health": {"get": {"summary": "ok, or 503 while TEs are missing or the server drains",
                                "responses": {"200": {"description": "ok"}, "503": {"description": "degraded"}}}},
            "/admin/cluster": _get("TEs, groups and recent jobs"),
        },
        "components": {"schemas": {"Error": _ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
