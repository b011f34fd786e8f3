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
follows it in detail.
"""
import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import time
import tomllib
from contextlib import aclosing
from dataclasses import dataclass, field, fields, replace

import orjson
from aiohttp import web

from flowserve.config import EngineConfig, cache_dir, check_tensor_parallel, default_model_path, read_model_config
from flowserve.protocol import SamplingParams
from flowserve.tokenizer import Tokenizer
from scaling.autoscaler import ScalePolicy, autoscale
from scaling.node import local_host
from scheduler.caches import ContextCaches
from scheduler.cluster import GROUPS, Cluster, NoRoom
from scheduler.je import JobExecutor
from scheduler.metrics import Metrics
from scheduler.openapi import openapi
from scheduler.pd_policy import Heatmap
from scheduler.pd_profile import add_profile_parser
from scheduler import protocol
from scheduler.protocol import APIError, model_not_found, parse_chat, parse_completion, parse_json, parse_scale


def cmd_generate(args: argparse.Namespace) -> None:
    from flowserve.engine import Engine
    from flowserve.tokenizer import Detokenizer

    model = args.model or default_model_path()
    tok = Tokenizer.load(model)
    cfg = EngineConfig(device=args.device, dtype=args.dtype, num_threads=args.threads,
                       async_scheduling=args.async_scheduling, tensor_parallel_size=args.tensor_parallel_size)
    check_tensor_parallel_sizes(model, {"colocated": (1, cfg)})
    engine = Engine(model, cfg, fork_executors=True)  # a fresh interpreter that has computed nothing yet
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
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

log = logging.getLogger("deepflow")
BODY_TIMEOUT_S = 30


@dataclass
class Frontend:
    """What the routes know besides the cluster: the served name and the limits on a request."""
    model_name: str
    api_key: str | None
    max_body: int
    started: int = field(default_factory=lambda: int(time.time()))


FRONTEND = web.AppKey("frontend", Frontend)
CLUSTER = web.AppKey("cluster", Cluster)
JE = web.AppKey("je", JobExecutor)
METRICS = web.AppKey("metrics", Metrics)
POLICIES = web.AppKey("policies", dict[str, ScalePolicy])
DRAINING = web.AppKey("draining", asyncio.Event)


def error_response(e: APIError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return web.json_response(e.body(), status=e.status, headers=headers, dumps=lambda o: orjson.dumps(o).decode())


def json_response(obj: dict) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    """Every failure leaves as OpenAI's error JSON with the right status, never a traceback."""
    app = request.app
    try:
        if request.path.startswith("/v1/") or (request.path.startswith("/admin/") and request.method == "POST"):
            if app[DRAINING].is_set():
                raise APIError(503, "server is shutting down")
            if app[FRONTEND].api_key:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), app[FRONTEND].api_key.encode()):
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


def check_request(request: web.Request,
                  req: protocol.ChatRequest | protocol.CompletionRequest | protocol.CacheRequest) -> None:
    if req.model not in (None, request.app[FRONTEND].model_name):
        raise model_not_found(req.model)
    if getattr(req, "ignored_fields", None):  # accepted, as OpenAI's API evolves, but said
        log.info("%s: ignoring unknown fields %s", request.path, req.ignored_fields)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(await read_json(request))
    check_request(request, req)
    job = request.app[JE].chat_job(req)
    return await respond(request, job, req.options.stop, req.stream, req.include_usage)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await read_json(request))
    check_request(request, req)
    job = request.app[JE].completion_job(req)
    return await respond(request, job, req.options.stop, req.stream, req.include_usage)


async def respond(request: web.Request, job, stop: list[str], stream: bool, include_usage: bool) -> web.StreamResponse:
    je: JobExecutor = request.app[JE]
    je.start(job, stop)  # 429 here, before any byte is sent
    if not stream:
        texts, finishes = [""] * len(job.tasks), [""] * len(job.tasks)
        async with aclosing(je.stream(job)) as deltas:
            async for d in deltas:
                texts[d.index] += d.text
                finishes[d.index] = d.finish_reason or finishes[d.index]
        return json_response(protocol.full_response(job, texts, finishes, je.usage(job)))

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(obj: dict) -> None:
        await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    try:
        async with aclosing(je.stream(job)) as deltas:
            for c in protocol.first_chunks(job):
                await send(c)
            async for d in deltas:
                await send(protocol.chunk(job, d.index, d.text, d.finish_reason))
        if include_usage:
            await send(protocol.usage_chunk(job, je.usage(job)))
    except APIError as e:  # headers are gone: the error travels as an event
        await send(e.body())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def create_cache(request: web.Request) -> web.Response:
    """`{"model", "messages" | "prompt", "ttl_seconds"}`: a context cache, computed and pinned
    before the answer; chat and completion requests use it by `"cache_id"`."""
    req = protocol.parse_cache(await read_json(request))
    check_request(request, req)
    je: JobExecutor = request.app[JE]
    cache = await je.caches.create(request.app[FRONTEND].model_name, *je.context_tokens(req), req.ttl_seconds)
    return json_response(cache.to_dict())


async def list_caches(request: web.Request) -> web.Response:
    caches = request.app[JE].caches
    caches.expire()
    return json_response({"object": "list", "data": [c.to_dict() for c in caches.caches.values()]})


async def get_cache(request: web.Request) -> web.Response:
    return json_response(request.app[JE].caches.get(request.match_info["cache_id"]).to_dict())


async def delete_cache(request: web.Request) -> web.Response:
    cache_id = request.match_info["cache_id"]
    request.app[JE].caches.delete(cache_id)
    return json_response({"id": cache_id, "object": "context_cache.deleted", "deleted": True})


async def models(request: web.Request) -> web.Response:
    app = request.app
    return json_response({"object": "list", "data": [{
        "id": app[FRONTEND].model_name, "object": "model", "created": app[FRONTEND].started, "owned_by": "deepflow",
        "max_model_len": app[CLUSTER].max_model_len}]})


async def health(request: web.Request) -> web.Response:
    cluster: Cluster = request.app[CLUSTER]
    ok = cluster.healthy() and not request.app[DRAINING].is_set()
    return web.Response(body=orjson.dumps({"status": "ok" if ok else "degraded", "tes_ready": len(cluster.ready_tes())}),
                        status=200 if ok else 503, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def openapi_json(request: web.Request) -> web.Response:
    app = request.app
    return json_response(openapi(app[FRONTEND].model_name, app[CLUSTER].max_model_len, bool(app[FRONTEND].api_key)))


async def admin_cluster(request: web.Request) -> web.Response:
    return json_response({**request.app[CLUSTER].to_dict(), **request.app[JE].to_dict()})


async def admin_scale(request: web.Request) -> web.Response:
    """`{"group": "colocated", "instances": N}`: set a group's size by hand (0 allowed); the
    autoscaler keeps it there (its min and max become N)."""
    req = parse_scale(await read_json(request))
    cluster: Cluster = request.app[CLUSTER]
    if req.group not in cluster.groups:
        raise APIError(400, f"unknown group {req.group!r}; groups: {sorted(cluster.groups)}", "group")
    if why := cluster.target_beyond_room(req.group, req.instances):  # the serving TEs are left alone
        raise APIError(409, why, "instances", code="insufficient_capacity")
    policy = request.app[POLICIES][req.group]
    policy.min_tes = policy.max_tes = req.instances  # a size set by hand holds until the next one
    cluster.scale_to(req.group, req.instances)
    return json_response({"group": req.group, "instances": req.instances})


def build_app(cluster: Cluster, je: JobExecutor, metrics_: Metrics, policies: dict[str, ScalePolicy],
              model_name: str, api_key: str | None, max_body: int) -> web.Application:
    app = web.Application(middlewares=[errors_and_auth], client_max_size=max_body)
    app[FRONTEND] = Frontend(model_name, api_key, max_body)
    app[CLUSTER], app[JE], app[METRICS], app[POLICIES], app[DRAINING] = cluster, je, metrics_, policies, asyncio.Event()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/caches", create_cache)
    app.router.add_get("/v1/caches", list_caches)
    app.router.add_get("/v1/caches/{cache_id}", get_cache)
    app.router.add_delete("/v1/caches/{cache_id}", delete_cache)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/cluster", admin_cluster)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_post("/admin/scale", admin_scale)
    return app


def default_heatmap_path() -> str:
    return str(cache_dir() / "pd_heatmap.json")


def cluster_shape(args: argparse.Namespace) -> dict[str, tuple[int, EngineConfig]]:
    """Each group's size and engine config: the flags, then a `--cluster` TOML file's tables
    on top, one per group, with `instances` and any EngineConfig field:

        [prefill]
        instances = 1
        [decode]
        instances = 2
        kv_cache_gb = 2.0
    """
    sizes = {"colocated": args.num_tes, "prefill": args.prefill_tes, "decode": args.decode_tes}
    overrides: dict[str, dict] = {g: {} for g in GROUPS}
    if args.cluster:
        with open(args.cluster, "rb") as f:
            doc = tomllib.load(f)
        known = {f.name for f in fields(EngineConfig)} - {"use_weight_cache", "serve_weights", "kv_listen", "host"}
        for group, table in doc.items():
            if group not in GROUPS or not isinstance(table, dict):
                raise SystemExit(f"{args.cluster}: unknown table [{group}]; groups are {', '.join(GROUPS)}")
            table = dict(table)
            sizes[group] = table.pop("instances", sizes[group])
            if unknown := set(table) - known:
                raise SystemExit(f"{args.cluster}: [{group}] has unknown keys {sorted(unknown)}")
            overrides[group] = table
    if (sizes["prefill"] > 0) != (sizes["decode"] > 0):
        raise SystemExit("prefill and decode TEs come together: give both or neither")
    if sum(sizes.values()) < 1:
        raise SystemExit("the cluster needs at least one TE (use --min-tes 0 to allow scaling to zero)")
    try:  # EngineConfig checks its fields
        base = EngineConfig(device=args.device, dtype=args.dtype, async_scheduling=args.async_scheduling,
                            kv_cache_gb=args.kv_cache_gb, dram_kv_gb=args.dram_kv_gb, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=args.max_model_len, kv_timeout_s=args.kv_timeout_s,
                            tensor_parallel_size=args.tensor_parallel_size)
        return {g: (sizes[g], replace(base, **overrides[g])) for g in GROUPS}
    except ValueError as e:
        raise SystemExit(f"cannot serve: {e}") from None


def check_tensor_parallel_sizes(model: str, shape: dict[str, tuple[int, EngineConfig]]) -> None:
    """Refuse, before anything starts, a TP size the model does not split into (any group's:
    an empty one may be scaled up later)."""
    sizes = {cfg.tensor_parallel_size for _, cfg in shape.values()} - {1}
    if sizes:
        model_cfg = read_model_config(model)
        for size in sorted(sizes):
            try:
                check_tensor_parallel(model_cfg, size)
            except ValueError as e:
                raise SystemExit(f"cannot run: {e}") from None


def load_heatmap(args: argparse.Namespace, shape: dict[str, tuple[int, EngineConfig]]) -> Heatmap | None:
    """With both colocated and PD TEs, the PD-aware step needs this machine's heatmap."""
    if not (shape["colocated"][0] and shape["prefill"][0]):
        return None
    path = args.pd_heatmap or default_heatmap_path()
    if not os.path.exists(path):
        raise SystemExit(f"no PD heatmap at {path}: run `python deepflow.py profile-pd` first, or pass --pd-heatmap")
    return Heatmap.load(path)


def scale_policies(args: argparse.Namespace, shape: dict[str, tuple[int, EngineConfig]]) -> dict[str, ScalePolicy]:
    """The autoscaler sizes the colocated group from the flags, up to what fits unless
    --max-tes says less; prefill and decode groups keep their size unless POST /admin/scale
    changes it."""
    policies = {g: ScalePolicy(min_tes=n, max_tes=n) for g, (n, _) in shape.items()}
    n = shape["colocated"][0]
    policies["colocated"] = ScalePolicy(min_tes=n if args.min_tes is None else args.min_tes,
                                        max_tes=None if args.max_tes is None else max(n, args.max_tes),
                                        waiting_per_te=args.scale_out_waiting, idle_s=args.scale_in_idle_s)
    return policies


def banner(args: argparse.Namespace, name: str, shape: dict[str, tuple[int, EngineConfig]]) -> str:
    url = f"http://{args.host}:{args.port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
    groups = ", ".join(f"{n} {g}" for g, (n, _) in shape.items() if n)
    return (f"DeepFlow serving {name} on {url} with {groups} TE(s)\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")


class Shutdown:
    """SIGINT/SIGTERM: the first starts a drain (in-flight jobs may finish, new ones get 503);
    a second ends every job now."""

    def __init__(self):
        self.requested, self.signals = asyncio.Event(), 0
        self.je: JobExecutor | None = None
        self.install()

    def install(self) -> None:
        """(Again after `ray.init`, whose own SIGTERM handler would only dump a stack.)"""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)

    def on_signal(self) -> None:
        self.signals += 1
        self.requested.set()
        if self.signals > 1 and self.je:
            self.je.fail_all("server is shutting down")

    async def drain(self, app: web.Application, timeout: float) -> None:
        je = app[JE]
        log.warning("draining %d job(s) for up to %.0f s", len(je.active), timeout)
        app[DRAINING].set()
        deadline = time.monotonic() + timeout
        while je.active and time.monotonic() < deadline and self.signals < 2:
            await asyncio.sleep(0.05)
        je.fail_all("server is shutting down")
        await asyncio.sleep(0.1)  # let the failed streams write their error event


async def serve(args: argparse.Namespace) -> None:
    model = args.model or default_model_path()
    name = args.served_model_name or os.path.basename(model.rstrip("/")).removesuffix(".gguf")
    shape = cluster_shape(args)
    check_tensor_parallel_sizes(model, shape)
    heatmap = load_heatmap(args, shape)
    tokenizer = Tokenizer.load(model)  # before the TEs: converts and caches a GGUF's vocabulary once
    ray = args.backend == "ray"
    # The local backend is this host; Ray hosts join as the backend finds them.
    hosts = [] if ray else [local_host(model, args.start_mode, args.prewarmed, shape["colocated"][1])]
    cluster = Cluster(model, shape, hosts, max_queued=args.max_queued, start_mode=args.start_mode,
                      policy=args.policy, imbalance=args.imbalance,
                      kv_transport="unix,tcp" if ray else args.kv_transport, heatmap=heatmap,
                      threads_per_te=args.threads_per_te, health_timeout_s=args.health_timeout_s, weights_donors=ray)
    shutdown = Shutdown()
    backend = None
    try:
        if ray:  # imported here only: the default path never loads Ray
            from scaling.ray_backend import RayBackend
            backend = RayBackend(cluster, args.ray_address, model, args.start_mode, args.prewarmed, shape["colocated"][1],
                                 args.health_timeout_s)
            await backend.start()
            shutdown.install()
        await cluster.start()
    except BaseException as e:
        await cluster.shutdown()
        if backend:
            await backend.stop()
        if isinstance(e, NoRoom):
            raise SystemExit(f"cannot start: {e}") from None
        raise
    policies = scale_policies(args, shape)
    autoscalers = [asyncio.create_task(autoscale(cluster, g, p)) for g, p in policies.items()]
    metrics_ = Metrics(cluster, name)
    caches = ContextCaches(cluster, args.cache_budget)
    autoscalers.append(asyncio.create_task(caches.expire_loop()))
    shutdown.je = je = JobExecutor(cluster, tokenizer, name, metrics_, caches)
    app = build_app(cluster, je, metrics_, policies, name, args.api_key, args.max_body_bytes)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(banner(args, name, shape), flush=True)

    await shutdown.requested.wait()
    await shutdown.drain(app, args.drain_timeout)
    await runner.cleanup()
    for a in autoscalers:
        a.cancel()
    await cluster.shutdown()
    if backend:
        await backend.stop()
    log.warning("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deepflow", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one chat prompt in-process, streaming to the terminal")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", help="GGUF file or HF directory (default: packaged SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights and activations (auto: float32 on CPU, bfloat16 on CUDA and NPU)")
    gen.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    gen.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="split the model over this many executor processes (flowserve/tp.py)")
    gen.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                     help="prepare each engine step while the device computes the one before (default: on for "
                          "CUDA and NPU, off on CPU)")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over TE processes")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--model", help="GGUF file or HF directory (default: packaged SmolLM2-135M-Instruct)")
    srv.add_argument("--served-model-name", help="the name clients send as `model`")
    srv.add_argument("--api-key", default=os.environ.get("DEEPFLOW_API_KEY"),
                     help="require `Authorization: Bearer KEY` on /v1 routes")
    srv.add_argument("--num-tes", type=int, default=1, help="colocated TEs at start")
    srv.add_argument("--prefill-tes", type=int, default=0, help="prefill TEs (PD disaggregation; with --decode-tes)")
    srv.add_argument("--decode-tes", type=int, default=0, help="decode TEs (PD disaggregation; with --prefill-tes)")
    srv.add_argument("--cluster", help="TOML file: a [colocated], [prefill] or [decode] table per group with "
                                       "`instances` and engine settings (kv_cache_gb, max_num_seqs, ...)")
    srv.add_argument("--kv-transport", choices=["unix", "tcp"], default="unix",
                     help="prefill -> decode KV: shared memory over a unix socket (one host), or TCP")
    srv.add_argument("--kv-timeout-s", type=float, default=10.0, help="a KV transfer that takes longer fails")
    srv.add_argument("--pd-heatmap", help="with colocated and PD TEs: the heatmap from `profile-pd` "
                                          "(default: the one it saved)")
    srv.add_argument("--min-tes", type=int, help="autoscaler floor (default: --num-tes; 0 = scale to zero)")
    srv.add_argument("--max-tes", type=int, help="autoscaler ceiling (default: as many as the hosts' memory fits)")
    srv.add_argument("--scale-out-waiting", type=int, default=4,
                     help="scale out when more sequences than this per TE wait for a batch slot")
    srv.add_argument("--scale-in-idle-s", type=float, default=30.0, help="scale in after this long without work")
    srv.add_argument("--start-mode", choices=["fork", "preloaded", "peer", "cold"], default="fork",
                     help="new TEs: forked from the warm template; pre-warmed processes mapping the cached "
                          "weights, or receiving them from a running TE; or fresh interpreters reading the "
                          "model file (the baseline)")
    srv.add_argument("--policy", choices=["locality", "load", "rr"], default="locality",
                     help="dist_sched: longest cached prefix while loads are balanced, else least loaded; "
                          "or always least loaded; or round-robin")
    srv.add_argument("--imbalance", type=int, default=4,
                     help="loads count as balanced while the busiest TE has at most this many more tasks")
    srv.add_argument("--prewarmed", type=int, default=1, help="pool of pre-warmed TEs (--start-mode preloaded or peer)")
    srv.add_argument("--threads-per-te", type=int, default=0,
                     help="torch threads per TE (0: its host's cores / TEs there, re-balanced as TEs come and go)")
    srv.add_argument("--health-timeout-s", type=float, default=10.0,
                     help="a TE silent this long (no heartbeat answer, no progress) is killed and replaced")
    srv.add_argument("--backend", choices=["local", "ray"], default="local",
                     help="local: TEs are this host's processes; ray: a node agent on every Ray node starts "
                          "them there (docs/DEPLOY.md)")
    srv.add_argument("--ray-address", default="auto", help="with --backend ray: the Ray cluster (HEAD_IP:PORT)")
    srv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights and activations (auto: float32 on CPU, bfloat16 on CUDA and NPU)")
    srv.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                     help="prepare each engine step while the device computes the one before (default: on for "
                          "CUDA and NPU, off on CPU)")
    srv.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per TE")
    srv.add_argument("--dram-kv-gb", type=float, default=0.0,
                     help="the RTC's DRAM tier per TE: blocks evicted from the KV cache, and preempted "
                          "requests, are kept in host memory and copied back where that beats recomputing")
    srv.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="each TE is a master and this many executor processes, one shard of the model each "
                          "(must divide its KV heads: 1 or 3 for SmolLM2-135M); per group: tensor_parallel_size "
                          "in --cluster")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    srv.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    srv.add_argument("--max-model-len", type=int, default=0, help="context length (0: the model's)")
    srv.add_argument("--max-queued", type=int, default=256, help="tasks waiting beyond running ones, then 429")
    srv.add_argument("--cache-budget", type=float, default=0.5,
                     help="fraction of each TE's KV cache that context caches (/v1/caches) may pin; past it, 507")
    srv.add_argument("--max-body-bytes", type=int, default=4 << 20)
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight jobs")
    srv.set_defaults(func=lambda a: asyncio.run(serve(a)))

    add_profile_parser(sub, default_heatmap_path)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
