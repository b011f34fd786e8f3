"""Autoscaling benchmark: a seeded bursty multi-model trace replayed against each autoscaler,
a burst at zero TEs against the same burst on a warm cluster, and a scale-out to all TEs that fit.

Each part starts `deepflow.py serve` on a free loopback port (tests/server_util.py):

1. trace: the same trace against `--autoscaler queue` (one TE per decision on queue depth,
   the first policy), `kpa` (Knative-like windows and SLOs) and `capacity` (the default;
   scaling/autoscaler.py), each from zero TEs (`--num-tes 0 --min-tes 0`, keep-alive
   --scale-in-idle-s 5, 8 batch slots per TE). Two base models, `smol` (the packaged
   SmolLM2-135M) and `tiny` (tests/tiny_model.py), and two LoRA adapters over smol, `a1` and
   `a2` (tests/lora_util.py); each request's model is drawn Zipf (s 1.1) over smol, a1,
   tiny, a2 (about 48%, 23%, 15%, 11%). The arrivals (seed 0, 70 s): Poisson at 0.5 req/s; a
   burst of 16 within 0.5 s at 10 s; a ramp from 0.5 to 4 req/s over 20-40 s; silence
   40-55 s (past the keep-alive); a burst of 16 at 58 s; Poisson at 0.5 req/s to the end.
   Each request streams 12 tokens of a 6-40 word prompt; the adapters are rank 8 on q_proj
   and v_proj. The TTFT SLOs come from a
   `--cluster` file's [model.NAME] tables (`SLO_TTFT_MS`). Reported per policy: SLO
   attainment (overall and per model), p50/p99 TTFT, TE-seconds (live TEs of both models
   sampled every 0.2 s), TE starts, requests that arrived while their model had no ready TE
   (cold starts), and a plot of each model's TEs over time against the arrivals.
2. burst: 32 concurrent streaming requests to a cluster at zero TEs (`--num-tes 0
   --min-tes 0`, 8 batch slots per TE, so the burst needs several TEs), then the same burst
   to a cluster started with as many TEs as the first one's autoscaler started; `--repeat`
   such pairs, and the median of their TTFT p99 ratios; once with the default pool of one
   pre-warmed TE (a standby forked from the template) and once with `--prewarmed 4`.
3. scale: at default flags (kv_cache_gb 1.0), POST /admin/scale to every TE that fits
   (the count a 409 names) and time until all are ready; the TEs' own timelines too.

    python bench/trace.py [--parts trace,burst,scale] [--policies queue,kpa,capacity] [--repeat 3] [--prewarmed 1,4]
                          [--out bench/results/trace.json]
"""
import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowserve.config import default_model_path, read_model_config  # noqa: E402
from tests.lora_util import write_adapter  # noqa: E402
from tests.server_util import Server, wait_until  # noqa: E402
from tests.tiny_model import write_tiny_model  # noqa: E402

MIX = ("smol", "a1", "tiny", "a2")        # Zipf ranks 1..4
BASE = {"smol": "smol", "a1": "smol", "a2": "smol", "tiny": "tiny"}
SLO_TTFT_MS = {"smol": 3000, "tiny": 1000}
MAX_TOKENS = 12
TRACE_FLAGS = ("--num-tes", "0", "--min-tes", "0", "--scale-in-idle-s", "5", "--max-num-seqs", "8",
               "--max-model-len", "512", "--kv-cache-gb", "0.05")
BURST_FLAGS = ("--max-num-seqs", "8", "--max-model-len", "512", "--kv-cache-gb", "0.05")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo zebras".split()


def make_trace(seed: int = 0) -> list[tuple[float, str]]:
    """(arrival time in s, model) of the documented trace."""
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
    weights = [1 / (k + 1) ** 1.1 for k in range(len(MIX))]
    return [(t, rng.choices(MIX, weights)[0]) for t in sorted(arrivals)]


async def stream_ttft(http: aiohttp.ClientSession, url: str, i: int, max_tokens: int = 16,
                      model: str | None = None) -> float | None:
    """Stream one completion; seconds until its first content chunk (None: it failed)."""
    rng = random.Random(i)
    prompt = f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            **({"model": model} if model else {})}
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


async def replay(s: Server, trace: list[tuple[float, str]]) -> dict:
    samples: list[tuple[float, dict, dict]] = []  # (t, live TEs per base, ready TEs per base)
    t0 = time.monotonic()

    async def watch():
        while True:
            models = (await asyncio.to_thread(s.get, "/admin/cluster"))["models"]
            samples.append((time.monotonic() - t0, {b: len(m["tes"]) for b, m in models.items()},
                            {b: sum(te["state"] == "ready" for te in m["tes"]) for b, m in models.items()}))
            await asyncio.sleep(0.2)

    async def one(http, i, at, model):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        cold = not samples or samples[-1][2][BASE[model]] == 0
        return await stream_ttft(http, s.url, i, MAX_TOKENS, model), cold

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        results = await asyncio.gather(*(one(http, i, at, m) for i, (at, m) in enumerate(trace)))
    await asyncio.sleep(1)
    watcher.cancel()
    ttfts = [r for r, _ in results if r is not None]
    met = [r is not None and r <= SLO_TTFT_MS[BASE[m]] / 1e3 for (r, _), (_, m) in zip(results, trace)]
    views = s.get("/admin/cluster")["models"]
    decisions = [d for v in views.values() for d in v["scaling_decisions"] if d["group"] not in ("template", "prewarm")]
    te_s = sum((b[0] - a[0]) * sum(a[1].values()) for a, b in zip(samples, samples[1:]))
    return {"requests": len(trace), "failed": len(trace) - len(ttfts), "slo_attainment": sum(met) / len(trace),
            "slo_attainment_by_model": {b: sum(x for x, (_, m) in zip(met, trace) if BASE[m] == b) /
                                        max(1, sum(BASE[m] == b for _, m in trace)) for b in views},
            "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
            "te_seconds": te_s, "te_starts": sum(max(0, d["to"] - d["from"]) for d in decisions),
            "scale_decisions": len(decisions), "cold_start_requests": sum(c for _, c in results),
            "reasons": sorted({d["reason"] for d in decisions}), "samples": samples,
            "decisions": [(d["t"], m, d["group"], d["from"], d["to"], d["reason"])
                          for m, v in views.items() for d in v["scaling_decisions"]],
            "ttfts": [(at, m, r) for (at, m), (r, _) in zip(trace, results)]}


def trace_flags(tmp: Path) -> tuple[str, ...]:
    """Two base models, two adapters over the first, each base's TTFT SLO in a --cluster file."""
    smol, cfg = default_model_path(), read_model_config(default_model_path())
    tiny = write_tiny_model(tmp / "tiny")
    (tmp / "cluster.toml").write_text("".join(f"[model.{b}]\nslo_ttft_ms = {ms}\n" for b, ms in SLO_TTFT_MS.items())
                                      + "[model.tiny.colocated]\nkv_cache_gb = 0.05\n")
    return ("--model", f"smol={smol}", "--model", f"tiny={tiny}", "--cluster", str(tmp / "cluster.toml"),
            *(x for i, a in enumerate(("a1", "a2"))
              for x in ("--lora-modules", f"{a}={write_adapter(tmp / a, cfg, i, targets=['q_proj', 'v_proj'])}")),
            *TRACE_FLAGS)


def trace_part(out: dict, policies: list[str]) -> None:
    trace = make_trace()
    with tempfile.TemporaryDirectory() as tmp:
        flags = trace_flags(Path(tmp))
        for policy in policies:
            with Server("--autoscaler", policy, *flags) as s:
                out[f"trace_{policy}"] = r = asyncio.run(replay(s, trace))
            print(f"{policy}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in r.items() if k not in ("samples", "decisions", "ttfts")),
                  flush=True)
    out["trace_arrivals"] = trace
    plot(out, policies, Path(__file__).resolve().parent.parent / "docs/img/trace_tes.png")


def plot(out: dict, policies: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(policies), 1, figsize=(8, 2.4 * len(policies)), sharex=True, squeeze=False)
    trace = out["trace_arrivals"]
    for ax, policy in zip(axes[:, 0], policies):
        r = out[f"trace_{policy}"]
        ax2 = ax.twinx()
        ax2.hist([[t for t, m in trace if BASE[m] == b] for b in SLO_TTFT_MS], bins=range(0, 72, 2), stacked=True,
                 color=["0.8", "0.9"], weights=[[0.5] * sum(BASE[m] == b for _, m in trace) for b in SLO_TTFT_MS])
        ax2.set_ylabel("arrivals/s")
        t = [x[0] for x in r["samples"]]
        for b, style in zip(SLO_TTFT_MS, ("C3-", "C0--")):
            ax.step(t, [x[1].get(b, 0) for x in r["samples"]], style, where="post", label=f"{b} TEs")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_ylabel("live TEs")
        ax.set_title(f"{policy}: {100 * r['slo_attainment']:.0f}% within SLO, {r['te_seconds']:.0f} TE-s, "
                     f"p99 TTFT {r['ttft_p99_ms'] / 1e3:.2f} s", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("time (s); grey: arrivals per second (dark smol and its adapters, light tiny)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


async def burst(s: Server, n: int = 32) -> list[float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        return [t for t in await asyncio.gather(*(stream_ttft(http, s.url, i) for i in range(n))) if t is not None]


def burst_pair(prewarmed: int) -> dict:
    """The burst at zero TEs (`prewarmed` standbys forked from the template: scaling/prewarm.py),
    then on a cluster started with the TEs the first one's autoscaler started."""
    with Server("--autoscaler", "capacity", "--num-tes", "0", "--min-tes", "0", "--prewarmed", str(prewarmed),
                *BURST_FLAGS) as s:
        cold = asyncio.run(burst(s))
        view = s.get("/admin/cluster")
    decisions = [d for d in view["scaling_decisions"] if d["group"] == "colocated"]
    n = str(max(d["to"] for d in decisions))
    with Server("--num-tes", n, "--min-tes", n, "--max-tes", n, *BURST_FLAGS) as s:
        wait_until(lambda: s.get("/admin/cluster")["prewarmed_ready"], 30)  # its pool refilled, not in the burst
        asyncio.run(burst(s, 1))  # the warm TE has served once, as a TE kept alive has
        warm = asyncio.run(burst(s))
    return {"tes": int(n), "decisions": [f"{d['from']}->{d['to']} {d['reason']}" for d in decisions],
            "cold_te_ms": [{k: round(te["timeline_ms"][k]) for k in ("scaler_pre", "total")} | {"mode": te["start_mode"]}
                           for te in view["tes"]],
            "cold_p50_ms": 1e3 * pct(cold, 0.5), "cold_p99_ms": 1e3 * pct(cold, 0.99),
            "warm_p50_ms": 1e3 * pct(warm, 0.5), "warm_p99_ms": 1e3 * pct(warm, 0.99),
            "p99_ratio": pct(cold, 0.99) / pct(warm, 0.99), "served": [len(cold), len(warm)]}


def burst_part(out: dict, repeat: int, prewarmed: list[int]) -> None:
    """`repeat` pairs for each pool floor, one after the other; the median of the pairs' p99
    ratios (the two sides of a pair run within seconds, so a neighbour's load hits both more
    often than it hits two pairs alike)."""
    out["burst"] = {}
    for k in prewarmed:
        pairs = []
        for _ in range(repeat):
            pairs.append(burst_pair(k))
            print(f"burst, --prewarmed {k}:", pairs[-1], flush=True)
        ratio = pct([p["p99_ratio"] for p in pairs], 0.5)
        out["burst"][f"prewarmed_{k}"] = {"pairs": pairs, "p99_ratio": ratio}
        print(f"burst, --prewarmed {k}: p99 ratios {[round(p['p99_ratio'], 2) for p in pairs]}, median {ratio:.2f}",
              flush=True)


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
    ap.add_argument("--policies", default="queue,kpa,capacity")
    ap.add_argument("--out", default="bench/results/trace.json")
    ap.add_argument("--repeat", type=int, default=3, help="burst: pairs of runs (medians reported)")
    ap.add_argument("--prewarmed", default="1,4", help="burst: the cold side's pool floors, one series each")
    args = ap.parse_args()
    out = {}
    for part in args.parts.split(","):
        if part == "trace":
            trace_part(out, args.policies.split(","))
        else:
            burst_part(out, args.repeat, [int(k) for k in args.prewarmed.split(",")]) if part == "burst" \
                else scale_part(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
