"""Soak: mixed load with clients that disconnect at random, watching for leaks.

Starts `deepflow.py serve` on a free loopback port (or uses --base-url), then for
--minutes runs --concurrency clients in a loop, each request drawn at random: a streamed
chat that the client abandons after a few chunks (--disconnect-frac), a streamed chat read
to the end, a non-streamed completion, or a bad request (400 expected). Every --sample
seconds it records the main process's RSS and open file descriptors, the TE's RSS and its
KV blocks in use; at the end it waits for the server to go idle and compares the first
and last samples. A leak shows as a trend in any column; 5xx answers are counted.

    python bench/soak.py --minutes 10 [--concurrency 16] [--out bench/results/soak.json]
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
from tests.server_util import Server  # noqa: E402


def proc_figures(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def client(http: aiohttp.ClientSession, base: str, rng: random.Random, stop_at: float,
                 counts: dict, disconnect_frac: float) -> None:
    while time.monotonic() < stop_at:
        kind = rng.choices(["abandon", "stream", "complete", "bad"], [disconnect_frac, 0.35, 0.2, 0.05])[0]
        prompt = " ".join(rng.choice(["cat", "river", "seven", "blue", "machine", "story"]) for _ in range(rng.randint(5, 200)))
        chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(8, 128),
                "temperature": rng.choice([0, 0.8]), "stream": True}
        try:
            if kind == "bad":
                async with http.post(base + "/v1/chat/completions", json={**chat, "temperature": 9}) as r:
                    counts[f"bad:{r.status}"] = counts.get(f"bad:{r.status}", 0) + 1
                continue
            if kind == "complete":
                async with http.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 16}) as r:
                    await r.read()
            else:
                async with http.post(base + "/v1/chat/completions", json=chat) as r:
                    chunks, cut = 0, rng.randint(1, 6)
                    async for line in r.content:
                        chunks += line.startswith(b"data: ")
                        if kind == "abandon" and chunks >= cut:
                            break  # leaving the block closes the connection mid-stream
            counts[f"{kind}:{r.status}"] = counts.get(f"{kind}:{r.status}", 0) + 1
        except (TimeoutError, aiohttp.ClientError) as e:
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1


def sample(base_get, main_pid: int, t0: float) -> dict:
    te = base_get("/admin/cluster")["tes"][0]
    rss, fds = proc_figures(main_pid)
    te_rss, _ = proc_figures(te["pid"])
    return {"t_s": round(time.monotonic() - t0, 1), "main_rss_mb": round(rss, 1), "main_fds": fds,
            "te_rss_mb": round(te_rss, 1), "kv_usage": te["kv_usage"], "running": te["running"]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--disconnect-frac", type=float, default=0.4)
    ap.add_argument("--sample", type=float, default=30)
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()

    server = Server("--max-model-len", "1024")
    t0 = time.monotonic()
    stop_at = t0 + 60 * args.minutes
    counts: dict = {}
    samples = [sample(server.get, server.proc.pid, t0)]
    try:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            rngs = [random.Random(i) for i in range(args.concurrency)]
            load = asyncio.gather(*(client(http, server.url, r, stop_at, counts, args.disconnect_frac) for r in rngs))
            while not load.done():
                await asyncio.wait([load], timeout=args.sample)
                samples.append(sample(server.get, server.proc.pid, t0))
                print(samples[-1], counts, flush=True)
            await load
        for _ in range(100):  # let the last aborts reach the TE
            if server.get("/admin/cluster")["tes"][0]["running"] == 0:
                break
            await asyncio.sleep(0.1)
        samples.append(sample(server.get, server.proc.pid, t0))
    finally:
        code = server.stop()
    first, warm, last = samples[0], samples[1], samples[-1]
    print(f"\n{sum(v for k, v in counts.items() if ':' in k)} requests in {args.minutes} min: {counts}; exit code {code}")
    print("| | start | after first sample | end (idle) |\n|---|---:|---:|---:|")
    for key in ("main_rss_mb", "main_fds", "te_rss_mb", "kv_usage", "running"):
        print(f"| {key} | {first[key]} | {warm[key]} | {last[key]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "counts": counts, "samples": samples}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
