"""Batch work beside interactive requests (issue 25): interactive TTFT while a 1,000-line batch
runs against the same interactive load alone, in one run, and the share of idle capacity the
batch uses. One server, one TE, three phases:

1. capacity: `--capacity-lines` batch lines alone: the tokens the TE computes for batch work
   per second when nothing else runs (C; prompt tokens not served by the prefix cache, plus
   generated tokens, from the output file's usage).
2. alone: streaming chat requests arriving as a Poisson process at `--rate` per second,
   half of `--interactive` of them: their TTFT.
3. mixed: the `--lines`-line batch, and the same interactive arrivals until it completes:
   their TTFT, and the batch's tokens per second over the phase (B); then the second half
   of the alone phase, so machine load that drifts weighs on both sides.

The share of idle capacity the batch uses is B / C: the interactive load is low, so nearly
all of the TE's capacity is idle to it (the share of the phase with an interactive request in
flight is printed beside it).

    .venv/bin/python bench/batch.py [--lines 1000] [--capacity-lines 200] [--rate 0.5] [--interactive 30]
"""
import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import RequestInput, send_request, stats_ms  # noqa: E402
from tests.server_util import Server  # noqa: E402

TOPICS = ["rain", "maps", "bread", "rivers", "glass", "owls", "trains", "salt", "clocks", "moss"]


def batch_lines(n: int, max_tokens: int, seed: int) -> bytes:
    """Short lines, chat and completion alternating."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = f"{rng.choice(TOPICS)} {i}"
        if i % 2:
            url, body = "/v1/completions", {"prompt": f"A fact about {topic}:", "max_tokens": max_tokens}
        else:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"One word on {topic}."}],
                                                 "max_tokens": max_tokens}
        out.append({"custom_id": f"line-{i}", "method": "POST", "url": url,
                    "body": {**body, "temperature": 0, "ignore_eos": True}})
    return "".join(json.dumps(x) + "\n" for x in out).encode()


async def run_batch(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[float, int, dict]:
    """Upload and run a batch to its end: seconds from create to completed, tokens computed, counts."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename="lines.jsonl")
    async with session.post(url + "/v1/files", data=form) as r:
        file_id = (await r.json())["id"]
    t0 = time.perf_counter()
    async with session.post(url + "/v1/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                       "endpoint": "/v1/chat/completions"}) as r:
        batch = await r.json()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.2)
        async with session.get(f"{url}/v1/batches/{batch['id']}") as r:
            batch = await r.json()
    seconds = time.perf_counter() - t0
    assert batch["status"] == "completed", batch
    async with session.get(f"{url}/v1/files/{batch['output_file_id']}/content") as r:
        usages = [json.loads(x)["response"]["body"]["usage"] for x in (await r.text()).splitlines()]
    tokens = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] + u["completion_tokens"]
                 for u in usages)
    return seconds, tokens, batch["request_counts"]


async def interactive(session: aiohttp.ClientSession, url: str, rng: random.Random, rate: float, count: int,
                      until: asyncio.Future | None, max_tokens: int) -> tuple[list[float], list[tuple[float, float]]]:
    """Streaming chat requests arriving as a Poisson process: `count` of them, or as many as
    arrive until `until` is done. Their TTFTs, and each one's (start, end) on perf_counter."""
    args = argparse.Namespace(model=None, no_ignore_eos=False, min_tokens=0, endpoint="chat", timeout=600)
    tasks = []
    while len(tasks) < count if until is None else not until.done():
        await asyncio.sleep(rng.expovariate(rate))
        i = len(tasks)
        req = RequestInput("", f"Question {i}: name a {TOPICS[i % len(TOPICS)]} word.", max_tokens)
        tasks.append(asyncio.create_task(send_request(session, url + "/v1/chat/completions", {}, req, args, 0.0)))
    results = await asyncio.gather(*tasks)
    bad = [r.error for r in results if not r.success]
    assert not bad, bad
    return [r.ttft for r in results], [(r.start, r.start + r.e2e) for r in results]


def busy_fraction(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """The share of [t0, t1] covered by the union of `spans`."""
    covered, end = 0.0, t0
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, t1)
        if b > a:
            covered += b - a
            end = b
    return covered / (t1 - t0)


async def bench(args: argparse.Namespace, url: str) -> None:
    tokens, half = args.interactive_tokens, args.interactive // 2
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await interactive(session, url, random.Random(), 100.0, 2, None, tokens)  # warm-up
        cap_s, cap_tokens, _ = await run_batch(session, url, batch_lines(args.capacity_lines, args.max_tokens, 1))
        loads = [os.getloadavg()[0]]
        ttft_alone, _ = await interactive(session, url, random.Random(args.seed), args.rate, half, None, tokens)
        t0 = time.perf_counter()
        done = asyncio.ensure_future(run_batch(session, url, batch_lines(args.lines, args.max_tokens, 2)))
        ttft_mixed, spans = await interactive(session, url, random.Random(args.seed), args.rate, 0, done, tokens)
        batch_s, batch_tokens, counts = await done
        loads.append(os.getloadavg()[0])
        ttft_alone += (await interactive(session, url, random.Random(args.seed + 1), args.rate,
                                         args.interactive - half, None, tokens))[0]
        loads.append(os.getloadavg()[0])
    capacity, used = cap_tokens / cap_s, batch_tokens / batch_s
    alone, mixed = stats_ms(ttft_alone), stats_ms(ttft_mixed)
    print(f"load average (1 min) after each phase: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"batch alone, {args.capacity_lines} lines: {capacity:.0f} tokens/s (C)")
    print(f"interactive alone (before and after):  {len(ttft_alone):3d} requests, TTFT p50 {alone['median']:7.1f} ms"
          f"  p99 {alone['p99']:7.1f} ms")
    print(f"interactive beside the batch:          {len(ttft_mixed):3d} requests, TTFT p50 {mixed['median']:7.1f} ms"
          f"  p99 {mixed['p99']:7.1f} ms   ({mixed['median'] / alone['median']:.2f}x, "
          f"{mixed['p99'] / alone['p99']:.2f}x)")
    print(f"batch of {counts['total']} lines ({counts['completed']} completed) in {batch_s:.1f} s: {used:.0f} tokens/s "
          f"(B); some interactive request in flight {busy_fraction(spans, t0, t0 + batch_s):.0%} of that time")
    print(f"share of the batch-alone capacity the batch used beside interactive load: B / C = {used / capacity:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--capacity-lines", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=8, help="per batch line")
    ap.add_argument("--rate", type=float, default=0.25, help="interactive requests per second")
    ap.add_argument("--interactive", type=int, default=30, help="interactive requests in the alone phases")
    ap.add_argument("--interactive-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="more `serve` flags, e.g. '--max-num-seqs 32'")
    args = ap.parse_args()
    with Server("--max-model-len", "512", "--kv-cache-gb", "0.25", *args.server_args.split()) as server:
        asyncio.run(bench(args, server.url))


if __name__ == "__main__":
    main()
