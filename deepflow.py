"""DeepFlow-py command line and HTTP frontend.

  python deepflow.py serve [flags]             the OpenAI-compatible server
  python deepflow.py generate --prompt "..."   one chat answer from an in-process engine
  python deepflow.py profile-pd                measure the PD heatmap serve's dist_sched uses

`serve` runs one asyncio process: the aiohttp routes below (validation, SSE), the job
executors (`scheduler/je.py`) and the cluster (`scheduler/cluster.py`) that places tasks on
TE processes (`flowserve/te_shell.py`). One chat request: `chat_completions` -> `JobExecutor.
chat_job` (template, tokenize) -> `JobExecutor.start` -> `Cluster.submit` -> `Cluster.
dist_sched` -> `TEHandle.submit` -> the TE's engine step loop -> `TEHandle._on_step` -> `JobExecutor._choice`
(detokenize, stop strings) -> `respond` (SSE chunk or JSON body). docs/WALKTHROUGH.md
follows it in detail. The flags of `serve` and `generate` are the fields of `ServeConfig`,
`GenerateConfig` and flowserve's `EngineConfig` (`add_flags`).
"""
import argparse
import asyncio
import hmac
import logging
import os
import signal
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, fields, replace
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel

from flowserve.config import (EngineConfig, add_flags, cache_dir, check_tensor_parallel, default_model_path, flag,
                              flag_type, from_args, read_model_config)
from flowserve.protocol import Adapter, SamplingParams
from flowserve.tokenizer import Tokenizer
from scaling.autoscaler import Board, ScalePolicy, autoscale
from scaling.hosts import Host, secret_env
from scaling.node import local_host
from scaling.te_listener import TEListener
from scheduler import api
from scheduler.api import APIError, parse_chat, parse_completion, parse_json, parse_scale
from scheduler.batch import Batches, batch_object
from scheduler.caches import ContextCaches
from scheduler.cluster import GROUPS, Cluster, NoRoom
from scheduler.files import Files, file_object
from scheduler.fine_tuning import FineTuning, job_object
from scheduler.je import JobExecutor
from scheduler.metrics import Metrics
from scheduler.models import Models, ServedModel, parse_named
from scheduler.openapi import openapi
from scheduler.pd_policy import Heatmap
from scheduler.pd_profile import add_profile_parser
from scheduler.state import SecretRow, StateDirBusy, StateStore, TERow, default_state_dir

MODEL_HELP = "GGUF file or HF directory (default: packaged SmolLM2-135M-Instruct)"


@dataclass
class GenerateConfig:
    """`generate`'s settings besides the engine's."""
    prompt: str = field(metadata={"help": "the user's message"})
    model: str | None = flag(MODEL_HELP)
    max_tokens: int = flag("tokens to generate at most", 256)
    temperature: float = flag("0: greedy", 0.0)
    top_p: float = flag("nucleus sampling: the smallest set of tokens this likely", 1.0)
    seed: int | None = flag("sampling seed")


def existing_model(path: str) -> str:
    if not os.path.exists(path):
        raise SystemExit(f"cannot run: no model at {path} (--model takes a GGUF file or an HF directory)")
    return path


def cmd_generate(args: argparse.Namespace) -> None:
    from flowserve.engine import Engine
    from flowserve.tokenizer import Detokenizer

    opts, cfg = from_args(GenerateConfig, args), from_args(EngineConfig, args)
    model = existing_model(opts.model or default_model_path())
    tok = Tokenizer.load(model)
    check_tensor_parallel_sizes(model, {"colocated": (1, cfg)})
    engine = Engine(model, cfg, fork_executors=True)  # a fresh interpreter that has computed nothing yet
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": opts.prompt}]))
    params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, max_tokens=opts.max_tokens)
    engine.add_request("cli", prompt, params)
    detok = Detokenizer(tok, prompt)
    t0, n = time.perf_counter(), 0
    while engine.has_work():
        for out in engine.step():
            n += len(out.token_ids)
            sys.stdout.write(detok.push(out.token_ids))
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"\n[{len(prompt)} prompt tokens, {n} generated in {dt:.2f} s, {n / dt:.1f} tokens/s]", file=sys.stderr)


# ---------------------------------------------------------------------------- serve

@dataclass
class ServeConfig:
    """`serve`'s settings besides the engine's (EngineConfig)."""
    host: str = flag("address the HTTP server listens on", "127.0.0.1")
    port: int = flag("port the HTTP server listens on", 8000)
    model: list[str] | None = flag(MODEL_HELP + "; NAME=PATH names it, and repeated it adds base models "
                                   "(the first is the default; the others start at 0 TEs and scale from zero)",
                                   action="append")
    served_model_name: str | None = flag("the name clients send as `model` for the first model (default: the model "
                                         "file's)")
    lora_modules: list[str] | None = flag("NAME=PATH: a PEFT LoRA adapter directory served as the model NAME over "
                                          "the first base model; repeatable", action="append")
    api_key: str | None = field(default_factory=lambda: os.environ.get("DEEPFLOW_API_KEY"), metadata={
        "help": "require `Authorization: Bearer KEY` on /v1 routes (default: $DEEPFLOW_API_KEY)"})
    allowed_origin: str = flag("origin whose browser pages may call the API (CORS; '': none)", "*")
    num_tes: int | None = flag("colocated TEs at start (default: 1; 0 with --prefill-tes and --decode-tes)")
    prefill_tes: int = flag("prefill TEs (PD disaggregation; with --decode-tes)", 0)
    decode_tes: int = flag("decode TEs (PD disaggregation; with --prefill-tes)", 0)
    cluster: str | None = flag("TOML file: a table per group ([colocated], ...), `instances` and engine settings; "
                               "[model.NAME]: a model's SLOs and its groups")
    kv_transport: str = flag("prefill -> decode KV: shared memory (one host) or TCP", "unix", choices=["unix", "tcp"])
    pd_heatmap: str | None = flag("with colocated and PD TEs: the heatmap from `profile-pd` (default: the saved one)")
    min_tes: int | None = flag("autoscaler floor, colocated group (default: its TEs at start; 0: scale to zero)")
    max_tes: int | None = flag("autoscaler ceiling, colocated group (default: as many as the hosts' memory fits)")
    autoscaler: str = flag("capacity: every group sized at once for its work's batch slots, compute within its fair "
                           "share of the cores, keep-alive by predicted arrivals; kpa: Knative-like windows and SLOs, "
                           "no notion of cores; queue: the colocated group, one TE at a time on queue depth "
                           "(scaling/autoscaler.py, docs/BENCHMARKS.md section 13)", "queue",
                           choices=["capacity", "kpa", "queue"])
    slo_ttft_ms: float = flag("time-to-first-token target the autoscaler keeps and /metrics counts (0: none; per "
                              "model: slo_ttft_ms in the --cluster file's [model.NAME])", 1000.0)
    slo_tpot_ms: float = flag("time-per-output-token target the autoscaler keeps (0: none; per model as above)", 0.0)
    scale_out_waiting: int = flag("queue autoscaler: scale out when more sequences than this per TE wait for a "
                                  "batch slot", 4)
    scale_in_idle_s: float = flag("keep-alive: a group without work this long scales in (to --min-tes)", 30.0)
    start_mode: str = flag("new TEs: forked from the warm template; pre-warmed, mapping the cached weights or "
                           "receiving them from a running TE; or cold interpreters (the baseline)", "fork",
                           choices=["fork", "preloaded", "peer", "cold"])
    policy: str = flag("dist_sched: longest cached prefix while loads are balanced, else least loaded; least loaded; "
                       "round-robin", "locality", choices=["locality", "load", "rr"])
    imbalance: int = flag("loads count as balanced while the busiest TE has at most this many more tasks", 4)
    prewarmed: int = flag("pre-warmed TEs kept per host at least (fork: standbys forked from the template; "
                          "preloaded, peer: model-agnostic processes); more by prediction (scaling/prewarm.py)", 1)
    threads_per_te: int = flag("torch threads per TE (0: its host's cores / its TEs, re-balanced as TEs come, go)", 0)
    health_timeout_s: float = flag("a TE silent this long (no heartbeat, no progress) is killed and replaced", 10.0)
    place_timeout_s: float = flag("a task no TE can take within this long ends with 503 and the reason", 60.0)
    backend: str = flag("local: TEs are this host's processes; ray: on Ray nodes (docs/DEPLOY.md)", "local",
                        choices=["local", "ray"])
    ray_address: str = flag("with --backend ray: the Ray cluster (HEAD_IP:PORT)", "auto")
    te_port: int = flag("port of the main process's TE listener: TEs of other hosts connect to it (--backend ray), "
                        "and TEs reconnect to it after a main-process restart (0: a free port, kept in the state dir)",
                        0)
    adopt_grace_s: float = flag("TEs (and node agents) outlive a crash of the main process this long, for a main "
                                "process started again with the same --state-dir to re-adopt them (0: they exit "
                                "with it)", 30.0)
    distflow_ports: str = flag("LO-HI: the TCP ports TEs' DistFlow listeners take on each host (KV between hosts, "
                               "weights to new hosts; each TE takes the first free one or two; empty: any free port)",
                               "")
    max_queued: int = flag("tasks waiting beyond running ones, then 429", 256)
    cache_budget: float = flag("fraction of a TE's KV cache that context caches (/v1/caches) may pin; past it 507", 0.5)
    max_body_bytes: int = flag("larger request bodies get 413", 4 << 20)
    drain_timeout: float = flag("seconds SIGTERM waits for in-flight jobs", 30.0)
    max_file_bytes: int = flag("uploads to /v1/files larger than this get 413", 256 << 20)
    state_dir: str = field(default_factory=default_state_dir, metadata={
        "help": "where what survives a restart lives: SQLite state.db, uploaded files (default: "
                "$DEEPFLOW_CACHE/state, i.e. ~/.cache/deepflow/state)"})

    def __post_init__(self):
        lo, _, hi = self.distflow_ports.partition("-")
        if self.distflow_ports and not (lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi) < 65536):
            raise ValueError(f"--distflow-ports {self.distflow_ports!r}: give a range LO-HI, e.g. 7100-7163")


log = logging.getLogger("deepflow")
BODY_TIMEOUT_S = 30


@dataclass
class Frontend:
    """What the routes know besides the models: the limits on a request, who may call."""
    api_key: str | None
    max_body: int
    allowed_origin: str


FRONTEND = web.AppKey("frontend", Frontend)
MODELS = web.AppKey("models", Models)
FILES = web.AppKey("files", Files)
BATCHES = web.AppKey("batches", Batches)
FINE_TUNING = web.AppKey("fine_tuning", FineTuning)
METRICS = web.AppKey("metrics", Metrics)
DRAINING = web.AppKey("draining", asyncio.Event)


def error_response(e: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return json_response(e.body(), e.status, headers)


def json_response(body: BaseModel | dict, status: int = 200, headers: dict | None = None) -> web.Response:
    """A typed body (scheduler/api.py), or a free-form one (/admin/cluster, /openapi.json)."""
    data = body.model_dump_json().encode() if isinstance(body, BaseModel) else orjson.dumps(body)
    return web.Response(body=data, status=status, headers=headers, content_type="application/json")


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    """Every failure leaves as OpenAI's error JSON with the right status, never a traceback."""
    app = request.app
    if request.method == "OPTIONS" and app[FRONTEND].allowed_origin:  # a browser's CORS preflight: no key
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST, DELETE",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})
    try:
        if request.path.startswith("/v1/") or (request.path.startswith("/admin/") and request.method == "POST"):
            if app[DRAINING].is_set():
                raise APIError(503, "server is shutting down")
            if app[FRONTEND].api_key:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                          app[FRONTEND].api_key.encode()):
                    raise APIError(401, "Incorrect or missing API key")
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return error_response(APIError(413, f"request body exceeds {app[FRONTEND].max_body} bytes"))
    except web.HTTPNotFound:
        return error_response(APIError(404, f"no route {request.method} {request.path}"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(APIError(e.status, e.reason))
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error_response(APIError(500, "internal server error"))


async def read_json(request: web.Request) -> dict:
    try:  # a client that trickles its body (slowloris) does not hold a handler forever
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError:
        raise APIError(408, f"request body not received within {BODY_TIMEOUT_S} s") from None
    return parse_json(raw)


def resolve(request: web.Request, req: api.GenerationRequest | api.CacheRequest) -> tuple[ServedModel, Adapter | None]:
    """The base model (and LoRA adapter) the request's `model` names; 404 if none."""
    if getattr(req, "ignored_fields", None):  # accepted, as OpenAI's API evolves, but said
        log.info("%s: ignoring unknown fields %s", request.path, req.ignored_fields)
    base, lora = request.app[MODELS].resolve(req.model)
    return base, lora and lora.wire


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await respond(request, parse_chat(await read_json(request)), JobExecutor.chat_job)


async def completions(request: web.Request) -> web.StreamResponse:
    return await respond(request, parse_completion(await read_json(request)), JobExecutor.completion_job)


async def respond(request: web.Request, req: api.GenerationRequest, make_job: Callable) -> web.StreamResponse:
    """`req` run as a job (`make_job`: `JobExecutor.chat_job` or `completion_job`) on the model it
    names, answered with one JSON body or, with stream=true, server-sent events."""
    base, adapter = resolve(request, req)
    je, job = base.je, make_job(base.je, req, adapter)
    je.start(job, req.stop_strings)  # 429 here, before any byte is sent
    if not req.stream:
        return json_response(await je.complete(job))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(event: BaseModel) -> None:
        await resp.write(b"data: " + event.model_dump_json().encode() + b"\n\n")

    try:
        async with aclosing(je.stream(job)) as deltas:
            for c in api.first_chunks(job):
                await send(c)
            async for d in deltas:
                await send(api.chunk(job, d.index, d.text, d.finish_reason, d.logprobs, d.tool_call))
        if req.include_usage:
            await send(api.usage_chunk(job, je.usage(job)))
    except APIError as e:  # headers are gone: the error travels as an event
        await send(e.body())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def create_cache(request: web.Request) -> web.Response:
    """`{"model", "messages" | "prompt", "ttl_seconds"}`: a context cache, computed and pinned
    before the answer; chat and completion requests use it by `"cache_id"`."""
    req = api.parse(api.CacheRequest, await read_json(request))
    base, adapter = resolve(request, req)
    if adapter:
        raise APIError(400, "context caches hold a base model's KV; name the base model", "model")
    cache = await base.je.caches.create(base.name, *base.je.context_tokens(req), req.ttl_seconds)
    return json_response(api.ContextCacheInfo(**cache.to_dict()))


def caches_of(request: web.Request) -> list[ContextCaches]:
    return [b.je.caches for b in request.app[MODELS].bases.values()]


def find_cache(request: web.Request) -> tuple[ContextCaches, str]:
    """The context caches (of one base model) that hold the path's id; 404 if none does."""
    cache_id = request.match_info["cache_id"]
    caches = caches_of(request)
    return next((c for c in caches if cache_id in c.caches), caches[0]), cache_id


async def list_caches(request: web.Request) -> web.Response:
    data = []
    for caches in caches_of(request):
        caches.expire()
        data += [c.to_dict() for c in caches.caches.values()]
    return json_response(api.ContextCacheList(data=data))


async def get_cache(request: web.Request) -> web.Response:
    caches, cache_id = find_cache(request)
    return json_response(api.ContextCacheInfo(**caches.get(cache_id).to_dict()))


async def delete_cache(request: web.Request) -> web.Response:
    caches, cache_id = find_cache(request)
    caches.delete(cache_id)
    return json_response(api.ContextCacheDeleted(id=cache_id))


def page_query(request: web.Request, default: int, most: int) -> tuple[int, str | None]:
    """A list route's `limit` (1 to `most`) and `after`, the last id the client has seen."""
    limit = request.query.get("limit", str(default))
    if not limit.isdecimal() or not 1 <= int(limit) <= most:
        raise APIError(400, f"'limit' must be an integer from 1 to {most}, got {limit!r:.20}", "limit")
    return int(limit), request.query.get("after")


async def part_chunks(part) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(1 << 16):
        yield chunk


async def upload_file(request: web.Request) -> web.Response:
    """multipart/form-data with `file` and `purpose` (batch | fine-tune), as OpenAI's."""
    files = request.app[FILES]
    if not request.content_type.startswith("multipart/form-data"):
        raise APIError(400, "expected a multipart/form-data body with the fields 'file' and 'purpose'")
    if (request.content_length or 0) > files.max_bytes + (1 << 20):  # the file, and room for the form around it
        raise APIError(413, f"the file exceeds {files.max_bytes} bytes (--max-file-bytes)", "file")
    purpose, upload = None, None
    try:
        try:
            async for part in await request.multipart():
                if part.name == "purpose":
                    purpose = (await part.read_chunk(256)).decode(errors="replace")
                elif part.name == "file" and upload is None:
                    upload = await files.receive(part_chunks(part), part.filename or "file")
        except (HttpProcessingError, ValueError) as e:  # a form aiohttp cannot parse
            raise APIError(400, f"malformed multipart/form-data body: {getattr(e, 'message', e)!s:.200}") from None
        if upload is None:
            raise APIError(400, "the form has no 'file' field", "file")
        return json_response(file_object(await files.keep(upload, purpose)))
    finally:
        if upload:
            upload.path.unlink(missing_ok=True)


async def list_files(request: web.Request) -> web.Response:
    rows, more = request.app[FILES].page(request.query.get("purpose"), *page_query(request, 10000, 10000))
    return json_response(api.FileList(data=[file_object(r) for r in rows], first_id=rows[0].id if rows else None,
                                      last_id=rows[-1].id if rows else None, has_more=more))


async def get_file(request: web.Request) -> web.Response:
    return json_response(file_object(request.app[FILES].get(request.match_info["id"])))


async def file_content(request: web.Request) -> web.FileResponse:
    path = request.app[FILES].path(request.match_info["id"])
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    request.app[FILES].delete(request.match_info["id"])
    return json_response(api.FileDeleted(id=request.match_info["id"]))


def batch_json(request: web.Request, row) -> web.Response:
    return json_response(batch_object(row, request.app[BATCHES].counts(row)))


async def create_batch(request: web.Request) -> web.Response:
    return batch_json(request, request.app[BATCHES].create(api.parse(api.BatchRequest, await read_json(request))))


async def list_batches(request: web.Request) -> web.Response:
    batches = request.app[BATCHES]
    rows, more = batches.page(*page_query(request, 20, 100))
    return json_response(api.BatchList(data=[batch_object(r, batches.counts(r)) for r in rows], has_more=more,
                                       first_id=rows[0].id if rows else None, last_id=rows[-1].id if rows else None))


async def get_batch(request: web.Request) -> web.Response:
    return batch_json(request, request.app[BATCHES].get(request.match_info["id"]))


async def cancel_batch(request: web.Request) -> web.Response:
    return batch_json(request, request.app[BATCHES].cancel(request.match_info["id"]))


async def create_fine_tuning_job(request: web.Request) -> web.Response:
    req = api.parse(api.FineTuningRequest, await read_json(request))
    return json_response(job_object(await request.app[FINE_TUNING].create(req)))


async def list_fine_tuning_jobs(request: web.Request) -> web.Response:
    rows, more = request.app[FINE_TUNING].page(*page_query(request, 20, 100))
    return json_response(api.FineTuningJobList(data=[job_object(r) for r in rows], has_more=more))


async def get_fine_tuning_job(request: web.Request) -> web.Response:
    return json_response(job_object(request.app[FINE_TUNING].get(request.match_info["id"])))


async def cancel_fine_tuning_job(request: web.Request) -> web.Response:
    return json_response(job_object(request.app[FINE_TUNING].cancel(request.match_info["id"])))


async def fine_tuning_events(request: web.Request) -> web.Response:
    data, more = request.app[FINE_TUNING].events(request.match_info["id"], *page_query(request, 20, 1000))
    return json_response(api.FineTuningEventList(data=data, has_more=more))


async def fine_tuning_checkpoints(request: web.Request) -> web.Response:
    data, more = request.app[FINE_TUNING].checkpoints(request.match_info["id"], *page_query(request, 10, 100))
    return json_response(api.FineTuningCheckpointList(data=data, has_more=more))


async def models(request: web.Request) -> web.Response:
    return json_response(api.ModelList(data=request.app[MODELS].cards()))


async def model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if card := next((c for c in request.app[MODELS].cards() if c.id == name), None):
        return json_response(card)
    raise api.model_not_found(name)


async def delete_model(request: web.Request) -> web.Response:
    """OpenAI's way to remove a fine-tuned model; here any adapter: it stops being served."""
    name = request.match_info["model"]
    request.app[MODELS].unload_adapter(name, "model")
    request.app[FINE_TUNING].forget(name)
    return json_response(api.ModelDeleted(id=name))


async def load_lora_adapter(request: web.Request) -> web.Response:
    req = api.parse(api.LoadLoraRequest, await read_json(request))
    lora = request.app[MODELS].load_adapter(req.lora_name, req.lora_path, req.base_model_name)
    log.warning("LoRA adapter %s loaded from %s over %s", lora.name, lora.spec.path, lora.base.name)
    return json_response(next(c for c in request.app[MODELS].cards() if c.id == lora.name))


async def unload_lora_adapter(request: web.Request) -> web.Response:
    req = api.parse(api.UnloadLoraRequest, await read_json(request))
    request.app[MODELS].unload_adapter(req.lora_name)
    return json_response(api.ModelDeleted(id=req.lora_name))


async def health(request: web.Request) -> web.Response:
    clusters = [b.cluster for b in request.app[MODELS].bases.values()]
    ok = all(c.healthy() for c in clusters) and not request.app[DRAINING].is_set()
    tes_ready = sum(len(c.ready_tes()) for c in clusters)
    return json_response(api.Health(status="ok" if ok else "degraded", tes_ready=tes_ready), 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    base = request.app[MODELS].default
    return json_response(openapi(base.name, base.cluster.max_model_len, bool(request.app[FRONTEND].api_key)))


async def admin_cluster(request: web.Request) -> web.Response:
    """The default base model's cluster and jobs at the top level; every base's under `models`."""
    models_ = request.app[MODELS]
    views = {b.name: {**b.cluster.to_dict(), **b.je.to_dict()} for b in models_.bases.values()}
    adapters = [{**c.model_dump(), "digest": models_.adapters[c.id].spec.digest}
                for c in models_.cards() if c.parent]
    return json_response({**views[models_.default.name], "models": views, "adapters": adapters})


async def admin_scale(request: web.Request) -> web.Response:
    """`{"model": NAME, "group": "colocated", "instances": N}`: set a group's size by hand (0
    allowed); the autoscaler keeps it there (its min and max become N)."""
    req = parse_scale(await read_json(request))
    bases = request.app[MODELS].bases
    if req.model is not None and req.model not in bases:
        raise APIError(400, f"no base model {req.model!r}; bases: {sorted(bases)}", "model")
    base = bases.get(req.model) or request.app[MODELS].default
    if req.group not in base.cluster.groups:
        raise APIError(400, f"unknown group {req.group!r}; groups: {sorted(base.cluster.groups)}", "group")
    if why := base.cluster.target_beyond_room(req.group, req.instances):  # the serving TEs are left alone
        raise APIError(409, why, "instances", code="insufficient_capacity")
    policy = base.policies[req.group]
    policy.min_tes = policy.max_tes = req.instances  # a size set by hand holds until the next one
    base.cluster.scale_to(req.group, req.instances)
    return json_response(req)


async def allow_origin(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, streams too (this runs as their headers go out), names the allowed origin."""
    if origin := request.app[FRONTEND].allowed_origin:
        response.headers["Access-Control-Allow-Origin"] = origin


def build_app(models_: Models, metrics_: Metrics, files: Files, batches: Batches, fine_tuning: FineTuning,
              frontend: Frontend) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=frontend.max_body)
    app.on_response_prepare.append(allow_origin)
    app[FRONTEND] = frontend
    app[MODELS], app[METRICS], app[DRAINING] = models_, metrics_, asyncio.Event()
    app[FILES], app[BATCHES], app[FINE_TUNING] = files, batches, fine_tuning
    app.add_routes([
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.get("/v1/models", models),
        web.get("/v1/models/{model:.+}", model),  # a fine-tuned model's name has colons, an HF one slashes
        web.delete("/v1/models/{model:.+}", delete_model),
        web.post("/v1/load_lora_adapter", load_lora_adapter),
        web.post("/v1/unload_lora_adapter", unload_lora_adapter),
        web.post("/v1/caches", create_cache),
        web.get("/v1/caches", list_caches),
        web.get("/v1/caches/{cache_id}", get_cache),
        web.delete("/v1/caches/{cache_id}", delete_cache),
        web.post("/v1/files", upload_file),
        web.get("/v1/files", list_files),
        web.get("/v1/files/{id}", get_file),
        web.get("/v1/files/{id}/content", file_content),
        web.delete("/v1/files/{id}", delete_file),
        web.post("/v1/batches", create_batch),
        web.get("/v1/batches", list_batches),
        web.get("/v1/batches/{id}", get_batch),
        web.post("/v1/batches/{id}/cancel", cancel_batch),
        web.post("/v1/fine_tuning/jobs", create_fine_tuning_job),
        web.get("/v1/fine_tuning/jobs", list_fine_tuning_jobs),
        web.get("/v1/fine_tuning/jobs/{id}", get_fine_tuning_job),
        web.post("/v1/fine_tuning/jobs/{id}/cancel", cancel_fine_tuning_job),
        web.get("/v1/fine_tuning/jobs/{id}/events", fine_tuning_events),
        web.get("/v1/fine_tuning/jobs/{id}/checkpoints", fine_tuning_checkpoints),
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get("/openapi.json", openapi_json),
        web.get("/admin/cluster", admin_cluster),
        web.post("/admin/scale", admin_scale),
    ])
    return app


def default_heatmap_path() -> str:
    return str(cache_dir() / "pd_heatmap.json")


def cluster_shape(cfg: ServeConfig, engine: EngineConfig, model: str | None = None) -> dict[str, tuple[int, EngineConfig]]:
    """Each group's size and engine config, for the first base model (`model` None) or another
    one. The first's come from the flags, then a `--cluster` TOML file's tables on top, one
    per group, with `instances` and any EngineConfig flag's field; another base model starts
    with no TE, and its tables sit under `[model.NAME]`:

        [prefill]
        instances = 1
        [decode]
        instances = 2
        kv_cache_gb = 2.0
        [model.tiny.colocated]
        instances = 1
    """
    first = model is None
    sizes = {"colocated": cfg.num_tes if first else 0, "prefill": cfg.prefill_tes if first else 0,
             "decode": cfg.decode_tes if first else 0}
    overrides: dict[str, dict] = {g: {} for g in GROUPS}
    doc = cluster_file(cfg)
    per_model = doc.pop("model", {})
    tables = doc if first else {g: t for g, t in per_model.get(model, {}).items() if g not in SLO_KEYS}
    known = {f.name: (flag_type(f), f.metadata.get("choices")) for f in fields(EngineConfig) if "help" in f.metadata}
    for group, table in tables.items():
        where = f"[{group}]" if first else f"[model.{model}.{group}]"
        if group not in GROUPS or not isinstance(table, dict):
            raise SystemExit(f"{cfg.cluster}: unknown table {where}; groups are {', '.join(GROUPS)}")
        table = dict(table)
        sizes[group] = table.pop("instances", sizes[group])
        if sizes[group] is not None and (type(sizes[group]) is not int or sizes[group] < 0):
            raise SystemExit(f"{cfg.cluster}: {where} instances must be a whole number >= 0, not {sizes[group]!r}")
        if unknown := set(table) - set(known):
            raise SystemExit(f"{cfg.cluster}: {where} has unknown keys {sorted(unknown)}")
        for key, value in table.items():  # as its flag would parse it
            kind, choices = known[key]
            if not (type(value) is kind or kind is float and type(value) is int) or choices and value not in choices:
                raise SystemExit(f"{cfg.cluster}: {where} {key} must be {' | '.join(choices or [kind.__name__])}, "
                                 f"not {value!r:.40}")
        overrides[group] = table
    if sizes["colocated"] is None:  # PD TEs alone make a PD-only cluster
        sizes["colocated"] = 0 if sizes["prefill"] or sizes["decode"] else 1
    if (sizes["prefill"] > 0) != (sizes["decode"] > 0):
        raise SystemExit("prefill and decode TEs come together: give both or neither")
    try:  # EngineConfig checks its fields
        return {g: (sizes[g], replace(engine, **overrides[g])) for g in GROUPS}
    except ValueError as e:
        raise SystemExit(f"cannot serve: {e}") from None


SLO_KEYS = ("slo_ttft_ms", "slo_tpot_ms")


def cluster_file(cfg: ServeConfig) -> dict:
    """The `--cluster` TOML file's tables (none without one)."""
    if not cfg.cluster:
        return {}
    try:
        with open(cfg.cluster, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"--cluster {cfg.cluster}: {e}") from None


def model_slos(cfg: ServeConfig, name: str) -> dict[str, float]:
    """A base model's SLO targets in seconds (ScalePolicy's fields): the flags', or its own in
    the `--cluster` file's [model.NAME] (`slo_ttft_ms`, `slo_tpot_ms`)."""
    table = cluster_file(cfg).get("model", {}).get(name, {})
    slos = {}
    for key in SLO_KEYS:
        ms = table.get(key, getattr(cfg, key))
        if not isinstance(ms, int | float) or isinstance(ms, bool) or ms < 0:
            raise SystemExit(f"{cfg.cluster}: [model.{name}] {key} must be a number of milliseconds >= 0, not {ms!r}")
        slos[key.removesuffix("_ms") + "_s"] = ms / 1e3
    return slos


def check_tensor_parallel_sizes(model: str, shape: dict[str, tuple[int, EngineConfig]]) -> None:
    """Refuse, before anything starts, a TP size the model does not split into (any group's:
    an empty one may be scaled up later)."""
    try:
        for size in sorted({cfg.tensor_parallel_size for _, cfg in shape.values()} - {1}):
            check_tensor_parallel(read_model_config(model), size)
    except ValueError as e:
        raise SystemExit(f"cannot run: {e}") from None


def load_heatmap(cfg: ServeConfig, shape: dict[str, tuple[int, EngineConfig]]) -> Heatmap | None:
    """With both colocated and PD TEs, the PD-aware step needs this machine's heatmap."""
    if not (shape["colocated"][0] and shape["prefill"][0]):
        return None
    path = cfg.pd_heatmap or default_heatmap_path()
    if not os.path.exists(path):
        raise SystemExit(f"no PD heatmap at {path}: a cluster of both colocated TEs ({shape['colocated'][0]}, from "
                         f"--num-tes or [colocated]) and PD TEs needs one to choose between them. Run `python "
                         f"deepflow.py profile-pd` first, pass --pd-heatmap, or serve PD only (no --num-tes)")
    return Heatmap.load(path)


def scale_policies(cfg: ServeConfig, shape: dict[str, tuple[int, EngineConfig]], slos: dict[str, float],
                   first: bool = True) -> dict[str, ScalePolicy]:
    """Each group's autoscaler policy (`slos`: the model's, `model_slos`). The colocated group
    scales from the flags, up to what fits unless --max-tes says less (another base model than
    the first: from its TEs at start, often 0, up to what fits). With `--autoscaler capacity`
    or `kpa` the prefill and decode groups of a PD cluster scale too, on their own load, from
    1 TE each (a PD task needs both); with `queue` they keep their size unless POST
    /admin/scale changes it."""
    common = dict(kind=cfg.autoscaler, waiting_per_te=cfg.scale_out_waiting, idle_s=cfg.scale_in_idle_s, **slos)
    n = shape["colocated"][0]
    policies = {"colocated": ScalePolicy(min_tes=n if cfg.min_tes is None or not first else cfg.min_tes,
                                         max_tes=None if cfg.max_tes is None or not first else max(n, cfg.max_tes),
                                         **common)}
    for g in ("prefill", "decode"):
        n = shape[g][0]
        scales = n > 0 and cfg.autoscaler != "queue"
        policies[g] = ScalePolicy(min_tes=1 if scales else n, max_tes=None if scales else n, **common)
    return policies


def banner(cfg: ServeConfig, models_: Models) -> str:
    url = f"http://{cfg.host}:{cfg.port}"
    auth = f" -H 'Authorization: Bearer {cfg.api_key}'" if cfg.api_key else ""
    name = models_.default.name
    groups = "; ".join(f"{b.name}: " + (", ".join(f"{n} {g}" for g, n in b.cluster.target.items() if n) or "0")
                       for b in models_.bases.values())
    return (f"DeepFlow serving {', '.join(c.id for c in models_.cards())} on {url} with TEs {groups}\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")


class Shutdown:
    """SIGINT/SIGTERM: the first starts a drain (in-flight jobs may finish, new ones get 503);
    a second ends every job now."""

    def __init__(self, jes: list[JobExecutor]):
        self.requested, self.signals, self.jes = asyncio.Event(), 0, jes
        self.install()

    def install(self) -> None:
        """(Again after `ray.init`, whose own SIGTERM handler would only dump a stack.)"""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)

    def on_signal(self) -> None:
        self.signals += 1
        self.requested.set()
        if self.signals > 1:
            for je in self.jes:
                je.fail_all("server is shutting down")

    async def drain(self, app: web.Application, timeout: float) -> None:
        log.warning("draining %d job(s) for up to %.0f s", sum(len(je.active) for je in self.jes), timeout)
        app[DRAINING].set()
        deadline = time.monotonic() + timeout
        while any(je.active for je in self.jes) and time.monotonic() < deadline and self.signals < 2:
            await asyncio.sleep(0.05)
        for je in self.jes:
            je.fail_all("server is shutting down")
        await asyncio.sleep(0.1)  # let the failed streams write their error event


def base_models(cfg: ServeConfig) -> list[tuple[str, str]]:
    """(name, path) of each base model: `--model PATH` or `--model NAME=PATH`, repeated."""
    named = [parse_named(m, "--model") if "=" in m else (None, m) for m in cfg.model or [default_model_path()]]
    named[0] = (cfg.served_model_name or named[0][0], named[0][1])
    named = [(name or os.path.basename(path.rstrip("/")).removesuffix(".gguf"), path) for name, path in named]
    for _, path in named:
        existing_model(path)
    if len({name for name, _ in named}) < len(named):
        raise SystemExit(f"two base models have one name: {[name for name, _ in named]}")
    return named


async def te_listener(cfg: ServeConfig, store: StateStore, address: str) -> TEListener:
    """Where TEs of other hosts connect, and TEs reconnect if the main process dies: --te-port
    on `address`, else the port the TEs of the previous main process know (the state dir),
    else a free one."""
    known = [row.main_address for row in store.select(TERow)]
    port = cfg.te_port or (int(known[0].rsplit(":", 1)[1]) if known else 0)
    listener = TEListener(address)
    try:
        await listener.start(port)
    except OSError as e:
        raise SystemExit(f"cannot serve: the TE listener cannot take port {port}: {e}") from None
    return listener


def distflow_secret(store: StateStore, model_path: str) -> dict[str, str]:
    """A base model's DistFlow secret (`secret_env`), kept in the state dir: the TEs that outlive
    a main-process crash hold it, and so must the TEs the next main process starts."""
    key = "distflow:" + model_path
    if row := store.get(SecretRow, key):
        return {"DEEPFLOW_DISTFLOW_SECRET": row.value}
    env = secret_env()
    store.insert(SecretRow(key, env["DEEPFLOW_DISTFLOW_SECRET"]))
    return env


def make_cluster(cfg: ServeConfig, name: str, path: str, shape: dict[str, tuple[int, EngineConfig]], first: bool,
                 machine: list[Host], store: StateStore, listener: TEListener | None) -> Cluster:
    """Base model `name`'s cluster (not started), on this machine (`machine`: the hosts of the
    bases before it, which share its memory and cores), or on Ray nodes as they join. With a
    `listener`, its TEs wait for a restarted main process there if this one dies."""
    check_tensor_parallel_sizes(path, shape)
    ray = cfg.backend == "ray"
    hosts = [] if ray else [local_host(path, cfg.start_mode, cfg.prewarmed, shape["colocated"][1], machine, name,
                                       distflow_secret(store, path))]
    return Cluster(path, shape, hosts, max_queued=cfg.max_queued, start_mode=cfg.start_mode,
                   policy=cfg.policy, imbalance=cfg.imbalance,
                   kv_transport="unix,tcp" if ray else cfg.kv_transport,
                   heatmap=load_heatmap(cfg, shape) if first else None, threads_per_te=cfg.threads_per_te,
                   health_timeout_s=cfg.health_timeout_s, place_timeout_s=cfg.place_timeout_s, weights_donors=ray,
                   distflow_ports=cfg.distflow_ports, state=store, main_address=listener.address if listener else "",
                   adopt_grace_s=cfg.adopt_grace_s if listener else 0.0)


async def serve(cfg: ServeConfig, engine: EngineConfig) -> None:
    named = base_models(cfg)
    if cfg.backend == "ray" and len(named) > 1:
        raise SystemExit("--backend ray serves one base model (its adapters too): give --model once")
    try:  # a port in use ends it here, before any process starts
        socket.create_server((cfg.host, cfg.port)).close()
    except OSError as e:
        raise SystemExit(f"cannot serve on {cfg.host}:{cfg.port}: {e.strerror}") from None
    try:
        store = StateStore(cfg.state_dir)
    except StateDirBusy as e:
        raise SystemExit(f"cannot serve: {e}") from None
    if cfg.backend == "ray":  # imported here only: the default path never loads Ray
        from scaling.ray_backend import RayBackend, ray_namespace
        from ray.util import get_node_ip_address
    listener = None
    if cfg.backend == "ray" or cfg.adopt_grace_s > 0:
        listener = await te_listener(cfg, store, get_node_ip_address() if cfg.backend == "ray" else "127.0.0.1")
    machine: list[Host] = []
    shapes = {name: cluster_shape(cfg, engine, None if i == 0 else name) for i, (name, _) in enumerate(named)}
    clusters = {name: make_cluster(cfg, name, path, shapes[name], i == 0, machine, store, listener)
                for i, (name, path) in enumerate(named)}
    slos = {name: model_slos(cfg, name) for name in clusters}
    metrics_ = Metrics(clusters, {name: slo["slo_ttft_s"] for name, slo in slos.items()})
    bases = []
    for i, (name, path) in enumerate(named):  # Tokenizer.load converts a GGUF's vocabulary once
        je = JobExecutor(clusters[name], Tokenizer.load(path), name, metrics_,
                         ContextCaches(clusters[name], cfg.cache_budget, store))
        bases.append(ServedModel(name, path, read_model_config(path), clusters[name], je,
                                 scale_policies(cfg, shapes[name], slos[name], i == 0)))
    models_ = Models(bases, engine.max_lora_rank)
    for value in cfg.lora_modules or ():  # a bad adapter ends it here, before any process starts
        try:
            models_.load_adapter(*parse_named(value, "--lora-modules"))
        except APIError as e:
            raise SystemExit(f"--lora-modules {value}: {e.message}") from None
    shutdown = Shutdown([b.je for b in bases])
    backend = None
    try:
        if cfg.backend == "ray":
            first = clusters[named[0][0]]
            backend = RayBackend(first, cfg.ray_address, named[0][1], cfg.start_mode, cfg.prewarmed,
                                 first.engine_cfgs["colocated"], cfg.health_timeout_s, listener,
                                 distflow_secret(store, named[0][1]), cfg.adopt_grace_s, ray_namespace(cfg.state_dir))
            await backend.start()
            shutdown.install()
        if cfg.adopt_grace_s > 0:  # after a crash: the TEs that waited for this process, their caches and targets
            await asyncio.gather(*(c.adopt(listener) for c in clusters.values()))
        for b in bases:
            b.je.caches.restore(b.name)
            for g in b.cluster.by_hand:
                b.policies[g].min_tes = b.policies[g].max_tes = b.cluster.target[g]
        await asyncio.gather(*(c.start() for c in clusters.values()))
        if listener:
            listener.settle()
        board = Board()  # the machine's groups, every base model's: fair shares of its cores
        background = [asyncio.create_task(autoscale(b.cluster, g, p, metrics_.recent[b.name], board, b.name))
                      for b in bases for g, p in b.policies.items()]
        background += [asyncio.create_task(b.je.caches.expire_loop()) for b in bases]
        files = Files(store, cfg.max_file_bytes)
        first = bases[0].cluster  # batch lines in flight: enough to fill the first model's batch slots
        batches = Batches(store, files, models_, max(first.engine_cfgs[g].max_num_seqs * max(1, n)
                                                     for g, n in first.target.items()))
        batches.resume()
        fine_tuning = FineTuning(store, files, models_)
        fine_tuning.resume()
        app = build_app(models_, metrics_, files, batches, fine_tuning,
                        Frontend(cfg.api_key, cfg.max_body_bytes, cfg.allowed_origin))
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        print(banner(cfg, models_), flush=True)

        await shutdown.requested.wait()
        await batches.stop()  # their lines resume at the next start, none recorded as failed for this one
        await fine_tuning.stop()  # so do training jobs, from their last checkpoints
        await shutdown.drain(app, cfg.drain_timeout)
        await runner.cleanup()
        for a in background:
            a.cancel()
    except NoRoom as e:  # the TEs at start do not fit
        raise SystemExit(f"cannot start: {e}") from None
    finally:
        await asyncio.gather(*(c.shutdown() for c in clusters.values()))
        if backend:
            await backend.stop()
        if listener:
            listener.close()
        store.close()
    log.warning("stopped")


def parser() -> argparse.ArgumentParser:
    """The command line: `serve` and `generate` flags come from their config dataclasses."""
    top = argparse.ArgumentParser(prog="deepflow", description=__doc__.split("\n")[0])
    top.add_argument("--log-level", default="warning")
    sub = top.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer one chat prompt in-process, streaming to the terminal")
    add_flags(gen, GenerateConfig)
    add_flags(gen, EngineConfig)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over TE processes")
    add_flags(srv, ServeConfig)
    add_flags(srv, EngineConfig, skip=("num_threads",))  # per TE: --threads-per-te
    srv.set_defaults(func=lambda a: asyncio.run(serve(from_args(ServeConfig, a), from_args(EngineConfig, a))))
    add_profile_parser(sub, default_heatmap_path)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
