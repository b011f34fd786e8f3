"""Autoscaling benchmark: a seeded bursty trace replayed against each autoscaler, a burst at
zero TEs against the same burst on a warm cluster, and a scale-out to all TEs that fit.

Each part starts `deepflow.py serve` on a free loopback port (tests/server_util.py):

1. trace: the same trace against `--autoscaler queue` (one TE per decision on queue depth,
   the old policy) and `--autoscaler slo` (scaling/autoscaler.py), each from zero TEs
   (`--num-tes 0 --min-tes 0`, keep-alive --scale-in-idle-s 5). The trace (seed 0, 70 s):
   Poisson arrivals at 0.5 req/s; a burst of 16 requests within 0.5 s at 10 s; a ramp from
   0.5 to 4 req/s over 20-40 s; silence 40-55 s (past the keep-alive); a second burst of
   16 at 58 s. Each request streams a short completion (prompt of 6-40 words, 16 tokens).
   Reported per policy: TTFT-SLO attainment (--slo-ttft-ms, 1000), p50/p99 TTFT,
   TE-seconds (live TEs sampled every 0.2 s), TE starts, requests that arrived at zero
   ready TEs (cold starts), and a plot of TEs over time against the arrival rate.
2. burst: 32 concurrent streaming requests to a cluster at zero TEs (`--num-tes 0
   --min-tes 0`, 8 batch slots per TE, so the burst needs several TEs), then the same burst to a cluster started with as many TEs
   as the first one's autoscaler started; the TTFT p99 ratio.
3. scale: at default flags (kv_cache_gb 1.0), POST /admin/scale to every TE that fits
   (the count a 409 names) and time until all are ready; the TEs' own timelines too.

    python bench/trace.py [--parts trace,burst,scale] [--out bench/results/trace.json]
"""
import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server_util import Server, wait_until  # noqa: E402

SLO_TTFT_S = 1.0
TRACE_FLAGS = ("--num-tes", "0", "--min-tes", "0", "--scale-in-idle-s", "5", "--max-num-seqs", "8",
               "--max-model-len", "512", "--kv-cache-gb", "0.05", "--slo-ttft-ms", str(SLO_TTFT_S * 1e3))
BURST_FLAGS = ("--max-num-seqs", "8", "--max-model-len", "512", "--kv-cache-gb", "0.05")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo zebras".split()


def make_trace(seed: int = 0) -> list[float]:
    """Arrival times (s) of the documented trace."""
    rng, arrivals = random.Random(seed), []

    def poisson(start: float, end: float, rate) -> None:
        t = start
        while True:
            t += rng.expovariate(rate(t))
            if t >= end:
                return
            arrivals.append(t)

    poisson(0, 20, lambda t: 0.5)
    arrivals += [10 + rng.uniform(0, 0.5) for _ in range(16)]
    poisson(20, 40, lambda t: 0.5 + 3.5 * (t - 20) / 20)
    arrivals += [58 + rng.uniform(0, 0.5) for _ in range(16)]
    poisson(58.5, 70, lambda t: 0.5)
    return sorted(arrivals)


async def stream_ttft(http: aiohttp.ClientSession, url: str, i: int, max_tokens: int = 16) -> float | None:
    """Stream one completion; seconds until its first content chunk (None: it failed)."""
    rng = random.Random(i)
    prompt = f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.monotonic()
    async with http.post(url + "/v1/completions", json=body) as r:
        first = None
        async for line in r.content:
            event = orjson.loads(line[6:]) if line.startswith(b"data: {") else {}
            if "error" in event:
                return None
            if first is None and event.get("choices") and event["choices"][0].get("text"):
                first = time.monotonic() - t0
        return first if r.status == 200 else None


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


async def replay(s: Server, arrivals: list[float]) -> dict:
    samples: list[tuple[float, int, int]] = []  # (t, live TEs, ready TEs)
    t0 = time.monotonic()

    async def watch():
        while True:
            tes = (await asyncio.to_thread(s.get, "/admin/cluster"))["tes"]
            samples.append((time.monotonic() - t0, len(tes), sum(te["state"] == "ready" for te in tes)))
            await asyncio.sleep(0.2)

    async def one(http, i, at):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        cold = not samples or samples[-1][2] == 0
        return await stream_ttft(http, s.url, i), cold

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        results = await asyncio.gather(*(one(http, i, at) for i, at in enumerate(arrivals)))
    await asyncio.sleep(1)
    watcher.cancel()
    ttfts = [r for r, _ in results if r is not None]
    decisions = s.get("/admin/cluster")["scaling_decisions"]
    te_s = sum((b[0] - a[0]) * a[1] for a, b in zip(samples, samples[1:]))
    return {"requests": len(arrivals), "failed": len(arrivals) - len(ttfts),
            "slo_attainment": sum(t <= SLO_TTFT_S for t in ttfts) / len(arrivals),
            "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
            "te_seconds": te_s, "te_starts": sum(max(0, d["to"] - d["from"]) for d in decisions),
            "scale_decisions": len(decisions), "cold_start_requests": sum(c for _, c in results),
            "samples": samples, "reasons": sorted({d["reason"] for d in decisions})}


def trace_part(out: dict) -> None:
    arrivals = make_trace()
    for policy in ("queue", "slo"):
        with Server("--autoscaler", policy, *TRACE_FLAGS) as s:
            out[f"trace_{policy}"] = r = asyncio.run(replay(s, arrivals))
        print(f"{policy}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items() if k != "samples"), flush=True)
    out["trace_arrivals"] = arrivals
    plot(out, Path(__file__).resolve().parent.parent / "docs/img/trace_tes.png")


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    arrivals = out["trace_arrivals"]
    bins = [i for i in range(0, 72, 2)]
    ax2 = ax.twinx()
    ax2.hist(arrivals, bins=bins, color="0.85", weights=[0.5] * len(arrivals), label="arrivals (req/s)")
    ax2.set_ylabel("arrivals per second")
    for policy, style in (("queue", "C0--"), ("slo", "C3-")):
        r = out[f"trace_{policy}"]
        t, live = [x[0] for x in r["samples"]], [x[1] for x in r["samples"]]
        ax.step(t, live, style, where="post",
                label=f"{policy}: {100 * r['slo_attainment']:.0f}% within SLO, {r['te_seconds']:.0f} TE-s")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("live TEs")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


async def burst(s: Server, n: int = 32) -> list[float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        return [t for t in await asyncio.gather(*(stream_ttft(http, s.url, i) for i in range(n))) if t is not None]


def burst_part(out: dict) -> None:
    with Server("--num-tes", "0", "--min-tes", "0", *BURST_FLAGS) as s:
        cold = asyncio.run(burst(s))
        started = max(d["to"] for d in s.get("/admin/cluster")["scaling_decisions"])
        first = s.get("/admin/cluster")["scaling_decisions"][0]
    n = str(started)
    with Server("--num-tes", n, "--min-tes", n, "--max-tes", n, *BURST_FLAGS) as s:
        asyncio.run(burst(s, 1))  # the warm TE has served once, as a TE kept alive has
        warm = asyncio.run(burst(s))
    out["burst"] = r = {"tes": started, "first_decision": {k: first[k] for k in ("from", "to", "reason")},
                        "cold_p50_ms": 1e3 * pct(cold, 0.5), "cold_p99_ms": 1e3 * pct(cold, 0.99),
                        "warm_p50_ms": 1e3 * pct(warm, 0.5), "warm_p99_ms": 1e3 * pct(warm, 0.99),
                        "p99_ratio": pct(cold, 0.99) / pct(warm, 0.99), "served": [len(cold), len(warm)]}
    print("burst:", r, flush=True)


def scale_part(out: dict) -> None:
    with Server() as s:
        status, body = s.post("/admin/scale", {"instances": 256})
        assert status == 409, (status, body)
        fits = int(re.search(r"(\d+) can run", body["error"]["message"]).group(1))
        t0 = time.monotonic()
        assert s.post("/admin/scale", {"instances": fits})[0] == 200
        wait_until(lambda: sum(te["state"] == "ready" for te in s.get("/admin/cluster")["tes"]) == fits, 120, 0.05)
        wall = time.monotonic() - t0
        tes = s.get("/admin/cluster")["tes"][1:]  # the TE started with the server is not timed here
        out["scale"] = r = {"tes": fits, "all_ready_s": wall,
                            "te_total_ms_max": max(te["timeline_ms"]["total"] for te in tes),
                            "te_post_load_ms_max": max(te["timeline_ms"]["te_post_load"] for te in tes)}
    print("scale:", r, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="trace,burst,scale")
    ap.add_argument("--out", default="bench/results/trace.json")
    args = ap.parse_args()
    out = {}
    for part in args.parts.split(","):
        {"trace": trace_part, "burst": burst_part, "scale": scale_part}[part](out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
