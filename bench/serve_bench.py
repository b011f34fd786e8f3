"""Serving benchmark client for any OpenAI-compatible server, in the style of `vllm bench serve`.

It sends `--num-prompts` streaming requests to `{base_url}/v1/chat/completions` (or
`/v1/completions`), paced by Poisson arrivals (`--request-rate`, `inf` = all at once) and/or
capped by a concurrency limit (`--max-concurrency`), and measures for every request:

- TTFT  time to first token: from sending the request to the first chunk carrying content;
- ITL   inter-token latencies: the gaps between successive content chunks;
- E2E   end-to-end latency: from sending the request to the end of the stream;
- TPOT  time per output token after the first: (E2E - TTFT) / (output_tokens - 1);
- output / prompt tokens, from the final `usage` chunk (`stream_options.include_usage`);
  when a server sends no usage, output tokens = number of content chunks.

It then prints a summary table (mean, median and p99 of each latency in ms, request and token
throughput, and goodput: requests/s meeting every SLO of `--goodput`), and optionally writes
all metrics plus per-request data as JSON (`--save-result`) and CDFs of TTFT, TPOT and E2E
latency as PNG (`--plot`, drawn by bench/plots.py with matplotlib).

Workloads (prompts are made of words, not tokens: no tokenizer is needed on the client side):

- `random`: each prompt is `--input-len` words drawn from a fixed word list with `--seed`;
- `shared-prefix`: `--num-prefixes` system prompts of `--prefix-len` words and `--num-users`
  distinct user questions of `--input-len` words; request i asks question i % num_users
  under a randomly chosen prefix, so a prefix cache has something to reuse.

Every request asks for `--output-len` tokens (`max_tokens`) with `"ignore_eos": true` (unless
`--no-ignore-eos`) and `"temperature": 0` (`--min-tokens` also sends `"min_tokens"`, for servers
without `ignore_eos`). Requests that still end early are counted and reported, which tells
whether the server honours `ignore_eos`.

The prompts depend only on `--seed`: a second run with the same seed against a server with a
prefix cache (llama-server keeps each slot's KV) measures cache hits; change the seed or
restart the server to measure cold prefills.

All traffic goes to `--base-url` only; the number of requests is bounded by `--num-prompts`
(plus one initial test request, skipped with `--skip-test-request`).

Example:
    python bench/serve_bench.py --base-url http://127.0.0.1:8000 --workload random \\
        --input-len 128 --output-len 128 --num-prompts 64 --max-concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

# A fixed list of plain English words: prompts are built from it, so runs are reproducible.
_WORD_TEXT = """
the of and to in is was that for on are with as by at be this from have or an they which one
you had not but what all were when we there can your said each she how their will use up
other about out many then them these so some her would make like him into time has look two
more write go see number no way could people my than first water been call who oil its now
find long down day did get come made may part over new sound take only little work know place
year live me back give most very after thing our just name good sentence man think say great
where help through much before line right too mean old any same tell boy follow came want
show also around form three small set put end does another well large must big even such
because turn here why ask went men read need land different home us move try kind hand
picture again change off play spell air away animal house point page letter mother answer
found study still learn should world high every near add food between own below country plant
last school father keep tree never start city earth eye light thought head under story saw
left few while along might close something seem next hard open example begin life always
those both paper together got group often run important until children side feet car mile
night walk white sea began grow took river four carry state once book hear stop without
second later miss idea enough eat face watch far real almost let above girl sometimes
mountain cut young talk soon list song being leave family
"""
WORDS: list[str] = _WORD_TEXT.split()


# --------------------------------------------------------------------------- workloads


@dataclass
class RequestInput:
    """One request to send: a system prompt (may be empty) and a user prompt."""

    system: str
    user: str
    output_len: int


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def make_random_workload(args: argparse.Namespace, rng: np.random.Generator) -> list[RequestInput]:
    return [RequestInput("", _words(rng, args.input_len), args.output_len)
            for _ in range(args.num_prompts)]


def make_shared_prefix_workload(args: argparse.Namespace,
                                rng: np.random.Generator) -> list[RequestInput]:
    prefixes = [f"You are assistant number {i}. " + _words(rng, args.prefix_len)
                for i in range(args.num_prefixes)]
    questions = [f"Question {u}: " + _words(rng, args.input_len) + "?"
                 for u in range(args.num_users)]
    return [RequestInput(prefixes[int(rng.integers(args.num_prefixes))],
                         questions[i % args.num_users], args.output_len)
            for i in range(args.num_prompts)]


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    """What was measured for one request (times in seconds)."""

    success: bool = False
    error: str = ""
    start: float = 0.0            # send time, relative to the benchmark start
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    requested_tokens: int = 0
    output_chars: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def build_payload(req: RequestInput, args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": args.model,
        "max_tokens": req.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if not args.no_ignore_eos:
        payload["ignore_eos"] = True
    if args.min_tokens:
        payload["min_tokens"] = req.output_len
    if args.endpoint == "chat":
        messages = [{"role": "system", "content": req.system}] if req.system else []
        payload["messages"] = messages + [{"role": "user", "content": req.user}]
    else:
        payload["prompt"] = (req.system + "\n\n" + req.user) if req.system else req.user
    return payload


def chunk_text(obj: dict[str, Any]) -> str:
    """The generated text carried by one streamed chunk ('' for role/usage-only chunks)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:  # chat.completion.chunk
        delta = choice["delta"] or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""  # text_completion


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                       req: RequestInput, args: argparse.Namespace,
                       t0: float) -> RequestResult:
    """Send one streaming request and time its chunks as they arrive."""
    res = RequestResult(requested_tokens=req.output_len)
    content_chunks = 0
    start = time.perf_counter()
    last = start
    res.start = start - t0
    try:
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with session.post(url, data=orjson.dumps(build_payload(req, args)),
                                headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = orjson.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])[:300]
                    return res
                now = time.perf_counter()
                text = chunk_text(obj)
                if text:
                    if content_chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    content_chunks += 1
                    res.output_chars += len(text)
                usage = obj.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens")
        res.e2e = time.perf_counter() - start
        if res.output_tokens == 0:
            res.output_tokens = content_chunks
        res.success = content_chunks > 0
        if not res.success:
            res.error = "stream ended without any content"
    except TimeoutError:
        res.error = f"timeout after {args.timeout} s"
    except (aiohttp.ClientError, orjson.JSONDecodeError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


# --------------------------------------------------------------------------- the run


async def resolve_model(session: aiohttp.ClientSession, base_url: str,
                        headers: dict[str, str]) -> str:
    """The first model listed by GET /v1/models (used when --model is not given)."""
    try:
        async with session.get(f"{base_url}/v1/models", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            models = (await resp.json(loads=orjson.loads)).get("data") or []
            return models[0]["id"] if models else "default"
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
        return "default"


async def run_benchmark(args: argparse.Namespace,
                        requests: list[RequestInput]) -> tuple[list[RequestResult], float]:
    base_url = args.base_url.rstrip("/")
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = base_url + path
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    rng = np.random.default_rng(args.seed + 1)  # arrival times, independent of the prompts
    # One fresh connection per request: reusing keep-alive connections races with servers that
    # close idle ones (llama-server does), which shows up as spurious "Server disconnected".
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        if args.model is None:
            args.model = await resolve_model(session, base_url, headers)
        if not args.skip_test_request:
            print(f"Initial test request to {url} (model {args.model!r}) ...")
            test = await send_request(session, url, headers, requests[0], args, time.perf_counter())
            if not test.success:
                raise SystemExit(f"Initial test request failed: {test.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(req: RequestInput) -> RequestResult:
            async with sem if sem else contextlib.nullcontext():
                return await send_request(session, url, headers, req, args, t0)

        print(f"Sending {len(requests)} requests, rate={args.request_rate} req/s, "
              f"max concurrency={args.max_concurrency or 'unlimited'} ...")
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[RequestResult]] = []
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(limited(req)))
            if math.isfinite(args.request_rate) and i + 1 < len(requests):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(results), duration


# --------------------------------------------------------------------------- metrics


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 0.5, 'tpot': 0.05} (seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2e") or not ms:
            raise SystemExit(f"--goodput: expected ttft:MS, tpot:MS or e2e:MS, got {item!r}")
        slos[name] = float(ms) / 1000.0
    return slos


def stats_ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1000.0
    if arr.size == 0:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max())}


def compute_metrics(results: list[RequestResult], duration: float,
                    slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = [r for r in ok if all(getattr(r, name) <= limit for name, limit in slos.items())]
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:10],
        "prompt_tokens_known": all(r.prompt_tokens is not None for r in ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ended_early": sum(r.output_tokens < r.requested_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "request_goodput": len(good) / duration if slos else None,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
    }


def print_table(m: dict[str, Any], args: argparse.Namespace) -> None:
    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label:<40}{text:>10}")

    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Maximum request concurrency:", args.max_concurrency or "inf")
    row("Request rate configured (req/s):", args.request_rate)
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Requests ended before max_tokens:", m["ended_early"])
    row("Request throughput (req/s):", m["request_throughput"])
    if m["request_goodput"] is not None:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    for key, name, title in (("ttft_ms", "TTFT", "Time to First Token"),
                             ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
                             ("itl_ms", "ITL", "Inter-token Latency"),
                             ("e2e_ms", "E2EL", "End-to-end Latency")):
        print("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {name} (ms):", m[key]["mean"])
        row(f"Median {name} (ms):", m[key]["median"])
        row(f"P99 {name} (ms):", m[key]["p99"])
    print("=" * 50)
    if not m["prompt_tokens_known"]:
        print("note: the server sent no usage for some requests; their prompt tokens count as 0")
    for err in m["errors"]:
        print(f"error: {err}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", default=None, help="sent as 'model' (default: first of /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--workload", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128,
                   help="words per prompt (random) or per user question (shared-prefix)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--prefix-len", type=int, default=256, help="words per shared system prompt")
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--num-users", type=int, default=16)
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    p.add_argument("--min-tokens", action="store_true",
                   help="also send min_tokens=--output-len (for servers without ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in req/s; inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--goodput", nargs="+", metavar="SLO:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (also e2e:MS)")
    p.add_argument("--skip-test-request", action="store_true")
    p.add_argument("--save-result", metavar="PATH.json")
    p.add_argument("--plot", metavar="PATH.png",
                   help="CDFs of TTFT, TPOT and E2E latency (matplotlib, bench/plots.py)")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be >= 1")
    if args.request_rate <= 0:
        p.error("--request-rate must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    slos = parse_goodput(args.goodput)
    rng = np.random.default_rng(args.seed)
    make = make_random_workload if args.workload == "random" else make_shared_prefix_workload
    requests = make(args, rng)
    results, duration = asyncio.run(run_benchmark(args, requests))
    metrics = compute_metrics(results, duration, slos)
    print_table(metrics, args)
    record = {"args": {k: (None if isinstance(v, float) and math.isinf(v) else v)
                       for k, v in vars(args).items()},
              "metrics": metrics,
              "requests": [asdict(r) | {"tpot": r.tpot} for r in results]}
    if args.save_result:
        with open(args.save_result, "wb") as f:
            f.write(orjson.dumps(record, option=orjson.OPT_INDENT_2))
        print(f"saved {args.save_result}")
    if args.plot and metrics["completed"]:
        from plots import latency_cdfs  # bench/plots.py; matplotlib is needed for --plot only
        latency_cdfs(record, args.plot)
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 1)
