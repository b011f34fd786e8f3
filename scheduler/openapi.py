"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Generated: the request and response bodies are the JSON schemas of the pydantic models that
validate and serialize them (scheduler/api.py), so it cannot drift from what the server accepts
and answers. It lists the routes of deepflow.py's `build_app` (but files, batches and
fine-tuning jobs) with the statuses they answer, bearer auth where the server has a key. Clients and fuzzers (tests/test_reliability.py runs
schemathesis, which checks each answer against its schema) read it from the running server, so
the model name and context length in it are the served ones.
"""
from pydantic import BaseModel

from scheduler.api import (CacheRequest, ChatCompletion, ChatCompletionChunk, ChatRequest, Completion,
                           CompletionRequest, ContextCacheDeleted, ContextCacheInfo, ContextCacheList, ErrorResponse,
                           Health, LoadLoraRequest, ModelCard, ModelDeleted, ModelList, ScaleRequest,
                           UnloadLoraRequest)

REF = "#/components/schemas/{model}"
CACHE_ID = {"name": "cache_id", "in": "path", "required": True, "schema": {"type": "string"}}
MODEL_ID = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
ANY = {"application/json": {"schema": {"type": "object"}}}
RESPONSES = (ChatCompletion, ChatCompletionChunk, Completion, ModelList, ContextCacheInfo, ContextCacheList,
             ContextCacheDeleted, Health, ErrorResponse, ModelCard, ModelDeleted)


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}


def _answer(body: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A JSON body, or with stream=true server-sent events (OpenAPI 3.1: the schema is one
    event's) whose data is a chunk or an error, each JSON, then [DONE]."""
    payload = {"anyOf": [{"$ref": REF.format(model=m.__name__)} for m in (chunk, ErrorResponse)]}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json",
                                            "contentSchema": payload}]}
    return _json(body) | {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                           "properties": {"data": data}}}}


def _op(summary: str, ok: dict, *errors: int, body: type[BaseModel] | None = None,
        auth: bool = False) -> dict:
    """One operation: 200 with `ok` (content by media type), the error statuses, the JSON body it takes."""
    errors += (401,) * auth + (408, 413) * bool(body)   # wrong key; body too slow or too large
    op = {"summary": summary, "responses": {"200": {"description": "ok", "content": ok}, **{
        str(s): {"description": "error", "content": _json(ErrorResponse)} for s in sorted(errors)}}}
    if body:
        op["requestBody"] = {"required": True, "content": _json(body)}
    return {**op, "security": [{"bearer": []}]} if auth else op


def openapi(model_name: str, max_model_len: int, auth: bool) -> dict:
    schemas = {}
    for model in (ChatRequest, CompletionRequest, CacheRequest, ScaleRequest, LoadLoraRequest, UnloadLoraRequest,
                  *RESPONSES):
        schema = model.model_json_schema(ref_template=REF)
        schemas |= schema.pop("$defs", {}) | {model.__name__: schema}
    generate = (400, 404, 429, 503)     # 404: a model we do not serve; 503: draining
    return {
        "openapi": "3.1.0",
        "info": {"title": "DeepFlow-py", "version": "0.1",
                 "description": f"OpenAI-compatible serving of {model_name}; context {max_model_len} tokens."},
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/chat/completions": {"post": _op("chat completion", _answer(ChatCompletion, ChatCompletionChunk),
                                                 *generate, body=ChatRequest, auth=auth)},
            "/v1/completions": {"post": _op("text completion", _answer(Completion, Completion),
                                            *generate, body=CompletionRequest, auth=auth)},
            "/v1/models": {"get": _op("the base models and LoRA adapters served", _json(ModelList), 503, auth=auth)},
            "/v1/models/{model}": {"get": {**_op("one served model", _json(ModelCard), 404, 503, auth=auth),
                                           "parameters": [MODEL_ID]}},
            "/v1/load_lora_adapter": {"post": _op("register a PEFT LoRA adapter directory as a model",
                                                  _json(ModelCard), 400, 503, body=LoadLoraRequest, auth=auth)},
            "/v1/unload_lora_adapter": {"post": _op("unregister an adapter (requests in flight finish)",
                                                    _json(ModelDeleted), 400, 404, 503, body=UnloadLoraRequest,
                                                    auth=auth)},
            "/v1/caches": {
                "post": _op("create a context cache: computed and pinned on a TE until its TTL ends",
                            _json(ContextCacheInfo), 400, 404, 429, 503, 507, body=CacheRequest, auth=auth),
                "get": _op("the live context caches", _json(ContextCacheList), 503, auth=auth)},
            "/v1/caches/{cache_id}": {
                "get": {**_op("one context cache", _json(ContextCacheInfo), 404, 503, auth=auth),
                        "parameters": [CACHE_ID]},
                "delete": {**_op("delete a context cache: its TEs unpin it", _json(ContextCacheDeleted), 404, 503,
                                 auth=auth), "parameters": [CACHE_ID]}},
            "/health": {"get": {"summary": "ok, or 503 while TEs are missing or the server drains", "responses": {
                "200": {"description": "ok", "content": _json(Health)},
                "503": {"description": "degraded", "content": _json(Health)}}}},
            "/metrics": {"get": _op("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}})},
            "/openapi.json": {"get": _op("this document", ANY)},
            "/admin/cluster": {"get": _op("TEs, groups and recent jobs", ANY)},
            "/admin/scale": {"post": _op("set a group's size by hand (the autoscaler keeps it)", _json(ScaleRequest),
                                         400, 503, body=ScaleRequest, auth=auth)},
        },
        "components": {"schemas": schemas, **({"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
                                              if auth else {})},
    }
