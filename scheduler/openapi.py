"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Generated: the request and response bodies are the JSON schemas of the pydantic models that
validate and serialize them (scheduler/api.py), so it cannot drift from what the server accepts
and answers. It lists every route of deepflow.py's `build_app` with the statuses it answers,
bearer auth where the server has a key. Clients and fuzzers (tests/test_reliability.py runs
schemathesis, which checks each answer against its schema) read it from the running server, so
the model name and context length in it are the served ones.
"""
from pydantic import BaseModel

from scheduler.api import (BatchList, BatchObject, BatchRequest, CacheRequest, ChatCompletion, ChatCompletionChunk,
                           ChatRequest, Completion, CompletionRequest, ContextCacheDeleted, ContextCacheInfo,
                           ContextCacheList, ErrorResponse, FileDeleted, FileList, FileObject,
                           FineTuningCheckpointList, FineTuningEventList, FineTuningJob, FineTuningJobList,
                           FineTuningRequest, Health, LoadLoraRequest, ModelCard, ModelDeleted, ModelList,
                           ScaleRequest, UnloadLoraRequest)

REF = "#/components/schemas/{model}"
ANY = {"application/json": {"schema": {"type": "object"}}}
RESPONSES = (ChatCompletion, ChatCompletionChunk, Completion, ModelList, ContextCacheInfo, ContextCacheList,
             ContextCacheDeleted, Health, ErrorResponse, ModelCard, ModelDeleted, FileObject, FileList, FileDeleted,
             BatchObject, BatchList, FineTuningJob, FineTuningJobList, FineTuningEventList, FineTuningCheckpointList)
UPLOAD = {"multipart/form-data": {"schema": {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch", "fine-tune"]}}}}}


def _param(name: str, where: str = "path", **schema) -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": "string", **schema}}


PAGE = [_param("limit", "query", pattern="^[0-9]+$"), _param("after", "query")]


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


def _op(summary: str, ok: dict, *errors: int, body: type[BaseModel] | dict | None = None,
        params: tuple[dict, ...] | list[dict] = (), auth: bool = False) -> dict:
    """One operation: 200 with `ok` (content by media type), the error statuses, the body it
    takes (a JSON model, or content by media type), its path and query parameters."""
    errors += (401,) * auth + (408, 413) * bool(body)   # wrong key; body too slow or too large
    op = {"summary": summary, "responses": {"200": {"description": "ok", "content": ok}, **{
        str(s): {"description": "error", "content": _json(ErrorResponse)} for s in sorted(errors)}}}
    if body:
        op["requestBody"] = {"required": True, "content": body if isinstance(body, dict) else _json(body)}
    if params:
        op["parameters"] = list(params)
    return {**op, "security": [{"bearer": []}]} if auth else op


def openapi(model_name: str, max_model_len: int, auth: bool) -> dict:
    schemas = {}
    for model in (ChatRequest, CompletionRequest, CacheRequest, ScaleRequest, LoadLoraRequest, UnloadLoraRequest,
                  BatchRequest, FineTuningRequest, *RESPONSES):
        schema = model.model_json_schema(ref_template=REF)
        schemas |= schema.pop("$defs", {}) | {model.__name__: schema}
    generate = (400, 404, 429, 503)     # 404: a model we do not serve; 503: draining
    id_ = (_param("id"),)
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
            "/v1/models/{model}": {
                "get": _op("one served model", _json(ModelCard), 404, 503, params=[_param("model")], auth=auth),
                "delete": _op("stop serving an adapter or fine-tuned model", _json(ModelDeleted), 400, 404, 503,
                              params=[_param("model")], auth=auth)},
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
                "get": _op("one context cache", _json(ContextCacheInfo), 404, 503, params=[_param("cache_id")],
                           auth=auth),
                "delete": _op("delete a context cache: its TEs unpin it", _json(ContextCacheDeleted), 404, 503,
                              params=[_param("cache_id")], auth=auth)},
            "/v1/files": {
                "post": _op("upload a JSONL file for batches or fine-tuning", _json(FileObject), 400, 503,
                            body=UPLOAD, auth=auth),
                "get": _op("the uploaded files, newest first", _json(FileList), 400, 503,
                           params=[*PAGE, _param("purpose", "query")], auth=auth)},
            "/v1/files/{id}": {
                "get": _op("one file", _json(FileObject), 404, 503, params=id_, auth=auth),
                "delete": _op("delete a file", _json(FileDeleted), 404, 503, params=id_, auth=auth)},
            "/v1/files/{id}/content": {"get": _op("a file's bytes", {"application/octet-stream": {
                "schema": {"type": "string"}}}, 404, 503, params=id_, auth=auth)},
            "/v1/batches": {
                "post": _op("run a file's requests at low priority", _json(BatchObject), 400, 404, 503,
                            body=BatchRequest, auth=auth),
                "get": _op("the batches, newest first", _json(BatchList), 400, 503, params=PAGE, auth=auth)},
            "/v1/batches/{id}": {"get": _op("one batch", _json(BatchObject), 404, 503, params=id_, auth=auth)},
            "/v1/batches/{id}/cancel": {"post": _op("cancel a batch (requests in flight finish)", _json(BatchObject),
                                                    404, 409, 503, params=id_, auth=auth)},
            "/v1/fine_tuning/jobs": {
                "post": _op("train a LoRA adapter on a file; it is served when done", _json(FineTuningJob),
                            400, 404, 503, body=FineTuningRequest, auth=auth),
                "get": _op("the fine-tuning jobs, newest first", _json(FineTuningJobList), 400, 503, params=PAGE,
                           auth=auth)},
            "/v1/fine_tuning/jobs/{id}": {"get": _op("one fine-tuning job", _json(FineTuningJob), 404, 503,
                                                     params=id_, auth=auth)},
            "/v1/fine_tuning/jobs/{id}/cancel": {"post": _op("cancel a fine-tuning job", _json(FineTuningJob),
                                                             404, 409, 503, params=id_, auth=auth)},
            "/v1/fine_tuning/jobs/{id}/events": {"get": _op("a job's events, newest first",
                                                            _json(FineTuningEventList), 400, 404, 503,
                                                            params=[*id_, *PAGE], auth=auth)},
            "/v1/fine_tuning/jobs/{id}/checkpoints": {"get": _op("a job's checkpoints, newest first",
                                                                 _json(FineTuningCheckpointList), 400, 404, 503,
                                                                 params=[*id_, *PAGE], auth=auth)},
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
