"""Many models on one pool (issue 22), through a real server (`deepflow.py serve`, started here
on a free loopback port by tests/server_util.py) with random PEFT adapters (tests/lora_util.py)
and the tiny HF model as a second base (tests/tiny_model.py). Each sub-benchmark compares its
two sides in one run, on one server:

- `cold`: first-token latency of a cold adapter (registered through /v1/load_lora_adapter, on
  disk, in no TE slot nor host cache) against a hot one (in a slot); medians over `--repeats`
  fresh adapters, the hot one asked between them. Goal <= 1.2x.
- `mix`: output-token throughput of `--streams` concurrent requests spread over 8 adapters
  against as many on the base alone, rounds alternated (--max-loras 8). Goal >= 0.8x.
- `zipf`: 100 registered adapters, 8 slots per TE, a seeded Zipf-skewed request mix: output
  throughput, slot hit rate (the TE's `lora_slot_loads` in /admin/cluster against the adapter
  requests), and each TE's memory (VmRSS, Pss) before and after.
- `base2`: a second base model (the tiny one) from zero TEs: first-token latency with its warm
  template in DRAM, then with its template evicted. Eviction is forced honestly: the host's
  memory (DEEPFLOW_HOST_MEMORY_GB) is set so the default model's second TE fits only once the
  idle tiny model's template leaves (scaling/hosts.py Host.make_room); a burst of requests on
  the default model makes the autoscaler start that TE; once it scaled back in, the tiny
  model's next request restarts its template.

    .venv/bin/python bench/many_models.py [--only cold,mix,zipf,base2] [--repeats 5] [--json OUT]

The first three share one server; `base2` starts its own. Prints one JSON object of figures.
"""
import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowserve.config import EngineConfig, default_model_path, read_model_config  # noqa: E402
from scaling.hosts import GiB, te_bytes  # noqa: E402
from tests.lora_util import write_adapter  # noqa: E402
from tests.server_util import Server, async_wait_until  # noqa: E402
from tests.tiny_model import write_tiny_model  # noqa: E402

WORDS = ("the river carried small boats past old stone houses while children counted birds on "
         "the bridge and a baker sold warm bread to tired workers near the market square").split()


def prompt(i: int, words: int = 24) -> str:
    """A distinct prompt per `i` (no prefix-cache hits between measurements)."""
    rng = random.Random(i)
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def ttft_ms(http: aiohttp.ClientSession, url: str, model: str | None, text: str, max_tokens: int = 4) -> float:
    """Send one streaming chat request; ms from sending to the first chunk carrying content."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, **({"model": model} if model else {})}
    t0 = time.perf_counter()
    first = None
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter()
    assert first is not None, "no content chunk"
    return 1e3 * (first - t0)


async def complete(http: aiohttp.ClientSession, url: str, model: str | None, text: str, max_tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **({"model": model} if model else {})}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
    return answer["usage"]["completion_tokens"]


async def throughput(http, url: str, jobs: list[tuple[str | None, str]], max_tokens: int, concurrency: int) -> float:
    """Output tokens/s of `jobs` (model, prompt), at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(model, text):
        async with gate:
            return await complete(http, url, model, text, max_tokens)

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(m, p) for m, p in jobs)))
    return tokens / (time.perf_counter() - t0)


async def load(http, url: str, name: str, path: Path) -> None:
    async with http.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}) as r:
        assert r.status == 200, await r.text()


def tes(server: Server, model: str | None = None) -> list[dict]:
    view = server.get("/admin/cluster")
    return view["models"][model]["tes"] if model else view["tes"]


def memory_mb(pid: int) -> dict:
    """A TE's resident memory (VmRSS) and its proportional share (Pss: pages it shares with the
    template and other forks count divided among them), in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return out


async def bench_cold(server: Server, tmp: Path, cfg, repeats: int) -> dict:
    url = server.url
    async with aiohttp.ClientSession() as http:
        await load(http, url, "hot", write_adapter(tmp / "hot", cfg, 1000))
        for i in range(3):  # now in a slot, and the server's first requests are behind it
            await ttft_ms(http, url, "hot", prompt(-1 - i))
        cold, hot = [], []
        for i in range(repeats):
            await load(http, url, f"cold{i}", write_adapter(tmp / f"cold{i}", cfg, 2000 + i))
            hot.append(await ttft_ms(http, url, "hot", prompt(10 * i)))
            cold.append(await ttft_ms(http, url, f"cold{i}", prompt(10 * i + 1)))
            hot.append(await ttft_ms(http, url, "hot", prompt(10 * i + 2)))
    te = tes(server)[0]
    disk_ms = [float(m) for m in re.findall(r"LoRA cold\d+ \(\w+\) read from disk in ([\d.]+) ms", server.output())]
    c, h = statistics.median(cold), statistics.median(hot)
    return {"cold_ttft_ms": [round(x, 1) for x in cold], "hot_ttft_ms": [round(x, 1) for x in hot],
            "cold_median_ms": round(c, 1), "hot_median_ms": round(h, 1), "ratio": round(c / h, 2), "goal": "<= 1.2",
            "te_lora_disk_loads": te["lora_disk_loads"], "te_lora_slot_loads": te["lora_slot_loads"],
            "te_lora_slot_load_ms_total": te["lora_slot_load_ms"], "cold_disk_load_ms": disk_ms}


async def bench_mix(server: Server, tmp: Path, cfg, streams: int, max_tokens: int, rounds: int) -> dict:
    url = server.url
    names = [f"mix{i}" for i in range(8)]
    async with aiohttp.ClientSession() as http:
        for i, n in enumerate(names):
            await load(http, url, n, write_adapter(tmp / n, cfg, 3000 + i))
        await asyncio.gather(*(complete(http, url, n, prompt(-100 - i), 2) for i, n in enumerate(names)))  # in slots
        base, lora = [], []
        for r in range(rounds):
            jobs = [prompt(1000 * r + i) for i in range(streams)]
            base.append(await throughput(http, url, [(None, p) for p in jobs], max_tokens, streams))
            lora.append(await throughput(http, url, [(names[i % 8], p + " ") for i, p in enumerate(jobs)],
                                         max_tokens, streams))
    b, l_ = statistics.median(base), statistics.median(lora)
    return {"streams": streams, "max_tokens": max_tokens, "base_tok_s": [round(x, 1) for x in base],
            "lora_tok_s": [round(x, 1) for x in lora], "base_median_tok_s": round(b, 1),
            "lora_median_tok_s": round(l_, 1), "ratio": round(l_ / b, 2), "goal": ">= 0.8"}


async def bench_zipf(server: Server, tmp: Path, cfg, requests: int, concurrency: int, max_tokens: int,
                     seed: int, s: float) -> dict:
    url = server.url
    names = [f"z{i}" for i in range(100)]
    async with aiohttp.ClientSession() as http:
        for i, n in enumerate(names):
            await load(http, url, n, write_adapter(tmp / n, cfg, 4000 + i))
        rng = random.Random(seed)
        weights = [1 / (k + 1) ** s for k in range(len(names))]
        mix = rng.choices(names, weights, k=requests)
        te0 = tes(server)[0]
        before = memory_mb(te0["pid"])
        t0 = time.perf_counter()
        rate = await throughput(http, url, [(m, prompt(5000 + i)) for i, m in enumerate(mix)], max_tokens, concurrency)
        wall = time.perf_counter() - t0
    te1 = tes(server)[0]
    loads = te1["lora_slot_loads"] - te0["lora_slot_loads"]
    return {"adapters": len(names), "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
            "zipf_s": s, "seed": seed, "distinct_adapters_asked": len(set(mix)),
            "top8_share": round(sum(m in names[:8] for m in mix) / requests, 2),
            "output_tok_s": round(rate, 1), "wall_s": round(wall, 1), "slot_loads": loads,
            "disk_loads": te1["lora_disk_loads"] - te0["lora_disk_loads"],
            "slot_hit_rate": round(1 - loads / requests, 3),
            "slot_load_ms_mean": round((te1["lora_slot_load_ms"] - te0["lora_slot_load_ms"]) / max(1, loads), 1),
            "te_memory_before": before, "te_memory_after": memory_mb(te1["pid"]),
            "template_memory": memory_mb(server.get("/admin/cluster")["template_pid"])}


def weights_bytes(model: str) -> int:
    """What a forked TE of `model` reports as its weights (scaling/template.py's mapped tensors
    and packed linears; flowserve/te_shell.py counts them the same way)."""
    from flowserve.engine import Engine
    from flowserve.weights import load_weights
    warm = Engine(None, EngineConfig(device="cpu", num_kv_blocks=4, num_threads=1), weights=load_weights(model))
    tensors, packs = warm.weights()
    return sum(t.numel() * t.element_size() for t in [*tensors.values(), *(t for p in packs for t in p.values())])


async def bench_base2(tmp: Path, repeats: int) -> dict:
    """The tiny model's TEs cost less than the default model's (its own [model.tiny.colocated]
    table), so: default weights + 1 default TE + tiny weights + 1 tiny TE fit, a second default
    TE fits only without the tiny model's weights."""
    smol, tiny = default_model_path(), write_tiny_model(tmp / "tiny")
    smol_cfg = EngineConfig(kv_cache_gb=0.25, max_num_seqs=4)
    tiny_cfg = EngineConfig(kv_cache_gb=0.05, max_num_seqs=4, max_num_batched_tokens=256)
    w_smol, w_tiny = weights_bytes(smol), weights_bytes(str(tiny))
    c_smol, c_tiny = te_bytes(smol_cfg, "fork", w_smol), te_bytes(tiny_cfg, "fork", w_tiny)
    memory = w_smol + 2 * c_smol + w_tiny // 2
    assert memory - w_smol - c_smol >= c_tiny + w_tiny
    (tmp / "cluster.toml").write_text("[model.tiny.colocated]\nkv_cache_gb = 0.05\nmax_num_batched_tokens = 256\n")
    flags = ("--model", f"smol={smol}", "--model", f"tiny={tiny}", "--kv-cache-gb", "0.25", "--max-num-seqs", "4",
             "--cluster", str(tmp / "cluster.toml"), "--scale-in-idle-s", "2", "--scale-out-waiting", "2")
    with Server(*flags, env={"DEEPFLOW_HOST_MEMORY_GB": repr(memory / GiB)}) as server:
        url = server.url
        count = lambda m: len(tes(server, m))  # noqa: E731
        warm, cold, events, timelines = [], [], [], []  # timelines: the tiny TE's start, ms
        async with aiohttp.ClientSession() as http:
            for i in range(repeats):  # template in DRAM: each from zero TEs
                await async_wait_until(lambda: count("tiny") == 0, 60)
                warm.append(await ttft_ms(http, url, "tiny", prompt(i)))
                timelines.append({"template": "warm", **tes(server, "tiny")[0]["timeline_ms"]})
            await async_wait_until(lambda: count("tiny") == 0, 60)
            for i in range(repeats):
                # a burst on smol: its second TE needs the tiny model's DRAM
                burst = asyncio.gather(*(complete(http, url, None, prompt(100 * i + j), 48) for j in range(16)))
                await async_wait_until(lambda: count("smol") == 2 or burst.done(), 120)
                await burst
                host = server.get("/admin/cluster")["models"]["tiny"]["hosts"][0]
                resident = host["weights_resident"] or host["template_pid"] is not None
                await async_wait_until(lambda: count("smol") == 1, 60)
                ms = await ttft_ms(http, url, "tiny", prompt(7000 + i))
                (cold if not resident else warm).append(ms)
                timelines.append({"template": "evicted" if not resident else "warm",
                                  **tes(server, "tiny")[0]["timeline_ms"]})
                events.append({"smol_scaled_to_2": True, "tiny_template_evicted": not resident,
                               "ttft_ms": round(ms, 1)})
                await async_wait_until(lambda: count("tiny") == 0, 60)
            view = server.get("/admin/cluster")
    return {"host_memory_gb": round(memory / GiB, 3), "weights_mb": {"smol": round(w_smol / 2**20, 1),
            "tiny": round(w_tiny / 2**20, 1)}, "te_cost_mb": {"smol": round(c_smol / 2**20), "tiny": round(c_tiny / 2**20)},
            "warm_ttft_ms": [round(x, 1) for x in warm], "warm_median_ms": round(statistics.median(warm), 1),
            "warm_goal": "<= 200",
            "evicted_ttft_ms": [round(x, 1) for x in cold],
            "evicted_median_ms": round(statistics.median(cold), 1) if cold else None, "events": events,
            "tiny_te_start_ms": [{k: v if isinstance(v, str) else round(v, 1) for k, v in t.items()}
                                 for t in timelines],
            "final_hosts": {m: v["hosts"][0]["weights_resident"] for m, v in view["models"].items()}}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="cold,mix,zipf,base2", help="comma-separated sub-benchmarks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--streams", type=int, default=32, help="mix: streams per side; zipf: requests in flight")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--zipf-requests", type=int, default=128)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--health-timeout-s", type=float, default=60.0,
                    help="the server's; its default 10 s kills a TE busy reading a burst of cold adapters")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cfg = read_model_config(default_model_path())
    out = {"nproc": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        if only & {"cold", "mix", "zipf"}:
            with Server("--max-loras", "8", "--max-tes", "1", "--kv-cache-gb", "0.5", "--health-timeout-s", str(args.health_timeout_s)) as server:
                if "cold" in only:
                    out["cold"] = await bench_cold(server, tmp, cfg, args.repeats)
                    print(json.dumps({"cold": out["cold"]}), flush=True)
                if "mix" in only:
                    out["mix"] = await bench_mix(server, tmp, cfg, args.streams, args.max_tokens, args.rounds)
                    print(json.dumps({"mix": out["mix"]}), flush=True)
                if "zipf" in only:
                    out["zipf"] = await bench_zipf(server, tmp, cfg, args.zipf_requests, args.streams, 16,
                                                   args.seed, args.zipf_s)
                    print(json.dumps({"zipf": out["zipf"]}), flush=True)
        if "base2" in only:
            out["base2"] = await bench_base2(tmp, args.repeats)
            print(json.dumps({"base2": out["base2"]}), flush=True)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
