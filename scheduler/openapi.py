"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Generated: the request bodies are the JSON schemas of the pydantic models that validate them
(scheduler/protocol.py), so it cannot drift from what the server accepts. It lists every
route of deepflow.py's `build_app` with the statuses it answers, bearer auth where the server
has a key. Clients and fuzzers (tests/test_reliability.py runs schemathesis) read it from the
running server, so the model name and context length in it are the served ones.
"""
from pydantic import BaseModel

from scheduler.protocol import CacheRequest, ChatRequest, CompletionRequest, ScaleRequest

REF = "#/components/schemas/{model}"
CACHE_ID = {"name": "cache_id", "in": "path", "required": True, "schema": {"type": "string"}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    """OpenAI's error body, the answer of every error status."""  # protocol.APIError.body
    error: ErrorDetail


def _content(schema: dict, media: str = "application/json") -> dict:
    return {"content": {media: {"schema": schema}}}


def _op(summary: str, ok: dict, *errors: int, body: type[BaseModel] | None = None,
        auth: bool = False) -> dict:
    """One operation: 200 with `ok`'s content, the error statuses, the JSON body it takes."""
    errors += (401,) * auth + (408, 413) * bool(body)   # wrong key; body too slow or too large
    op = {"summary": summary, "responses": {"200": {"description": "ok", **ok}, **{
        str(s): {"description": "error", **_content({"$ref": REF.format(model="Error")})}
        for s in sorted(errors)}}}
    if body:
        op["requestBody"] = {"required": True, **_content({"$ref": REF.format(model=body.__name__)})}
    return {**op, "security": [{"bearer": []}]} if auth else op


def openapi(model_name: str, max_model_len: int, auth: bool) -> dict:
    schemas = {}
    for model in (ChatRequest, CompletionRequest, CacheRequest, ScaleRequest, Error):
        schema = model.model_json_schema(ref_template=REF)
        schemas |= schema.pop("$defs", {}) | {model.__name__: schema}
    obj = _content({"type": "object"})
    generated = {"description": "a completion (JSON), or with stream=true server-sent events ending in [DONE]",
                 "content": {**obj["content"], "text/event-stream": {"schema": {"type": "string"}}}}
    generate = (400, 404, 429, 503)     # 404: a model we do not serve; 503: draining
    return {
        "openapi": "3.1.0",
        "info": {"title": "DeepFlow-py", "version": "0.1",
                 "description": f"OpenAI-compatible serving of {model_name}; context {max_model_len} tokens."},
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/chat/completions": {"post": _op("chat completion", generated, *generate, body=ChatRequest, auth=auth)},
            "/v1/completions": {"post": _op("text completion", generated, *generate, body=CompletionRequest, auth=auth)},
            "/v1/models": {"get": _op("the served model", obj, 503, auth=auth)},
            "/v1/caches": {
                "post": _op("create a context cache: computed and pinned on a TE until its TTL ends", obj,
                            400, 404, 429, 503, 507, body=CacheRequest, auth=auth),
                "get": _op("the live context caches", obj, 503, auth=auth)},
            "/v1/caches/{cache_id}": {
                "get": {**_op("one context cache", obj, 404, 503, auth=auth), "parameters": [CACHE_ID]},
                "delete": {**_op("delete a context cache: its TEs unpin it", obj, 404, 503, auth=auth),
                           "parameters": [CACHE_ID]}},
            "/health": {"get": {"summary": "ok, or 503 while TEs are missing or the server drains", "responses": {
                "200": {"description": "ok", **obj}, "503": {"description": "degraded", **obj}}}},
            "/metrics": {"get": _op("Prometheus metrics", _content({"type": "string"}, "text/plain"))},
            "/openapi.json": {"get": _op("this document", obj)},
            "/admin/cluster": {"get": _op("TEs, groups and recent jobs", obj)},
            "/admin/scale": {"post": _op("set a group's size by hand (the autoscaler keeps it)", obj, 400, 503,
                                         body=ScaleRequest, auth=auth)},
        },
        "components": {"schemas": schemas, **({"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
                                              if auth else {})},
    }
