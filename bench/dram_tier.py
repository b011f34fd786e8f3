"""The RTC's DRAM tier against recomputing, on the real default model, in one run.

(a) Evicted prefix. A ~1k-token prefix is computed (one request), evicted from the device
    by another request that fills the KV pool, then asked for again with a new tail: time to first
    token of that last request, the prefix populated from DRAM vs recomputed. Also the time
    of the evicting request, which with a DRAM tier pays the Copy of the evicted blocks.
(b) Preemption under memory pressure. Six requests whose prompts and outputs need ~2x the
    KV pool: total time, preempted sequences swapped out to DRAM and back vs recomputed (a
    recomputed one often finds much of its KV still in the device's prefix cache: the
    tokens each variant computed are shown too).

The engines: one with a DRAM tier (`--dram-kv-gb`, the cost model as measured at start),
one without (today's recompute). Variants are interleaved, their order alternating, for
`--repeats` rounds; medians, and their ratio. Each round's tokens are checked equal across
the variants. On a CPU both tiers are host RAM: the copy is a memcpy, the recompute a
prefill on the same cores.

    python bench/dram_tier.py [--repeats 3] [--prefix 1024] [--threads 0]
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402
from flowserve.weights import load_weights  # noqa: E402

FIRST = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def timed(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    return time.perf_counter() - t0, out


def evicted_prefix(engine: Engine, seed: int, prefix_len: int) -> tuple[float, float, list[list[int]]]:
    """(evicting request's time, TTFT of the prefix asked again, tokens)."""
    rng = random.Random(seed)
    prefix = tokens(rng, prefix_len)
    _, a = timed(engine, [prefix + tokens(rng, 16)], FIRST)
    pool = engine.rtc.num_blocks_total * engine.cfg.block_size
    evict, b = timed(engine, [tokens(rng, pool - engine.cfg.block_size)], FIRST)  # fills the pool
    ttft, c = timed(engine, [prefix + tokens(rng, 16)], FIRST)
    return evict, ttft, a + b + c


def preemption(engine: Engine, seed: int, prompt_len: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    rng = random.Random(seed)
    prompts = [tokens(rng, prompt_len) for _ in range(6)]
    return timed(engine, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def count_tokens(engine: Engine) -> list[int]:
    """Make `engine` add up the tokens its steps compute, in the list returned."""
    computed, run = [0], engine.runner.run

    def counting(work, *args, **kwargs):
        computed[0] += sum(n for _, n in work)
        return run(work, *args, **kwargs)
    engine.runner.run = counting
    return computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefix", type=int, default=1024, help="tokens of the evicted prefix, (a)")
    ap.add_argument("--dram-kv-gb", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    model = default_model_path()
    weights = load_weights(model)
    bs = 16
    # (a): room for one prefix and a bit, so the second request evicts the first's blocks.
    blocks_a = args.prefix // bs + 16
    # (b): 6 x (192 + 128) tokens need 120 blocks; 36 hold under a third.
    prompt_len, max_tokens, blocks_b = 192, 128, 36

    def engines(num_blocks: int) -> dict[str, Engine]:
        base = dict(num_kv_blocks=num_blocks, num_threads=args.threads)
        return {"recompute": Engine(model, EngineConfig(**base), weights=weights),
                "DRAM tier": Engine(model, EngineConfig(dram_kv_gb=args.dram_kv_gb, **base), weights=weights)}

    eng_a, eng_b = engines(blocks_a), engines(blocks_b)
    computed = {name: count_tokens(e) for name, e in eng_b.items()}
    stats = eng_a["DRAM tier"].stats()
    print(f"cost model (calibrated at start): copy {stats.copy_bytes_per_s / 1e9:.2f} GB/s, "
          f"prefill {stats.prefill_tokens_per_s:.0f} tokens/s; block {eng_a['DRAM tier'].rtc.cost.block_bytes} B")
    evict: dict[str, list[float]] = {name: [] for name in eng_a}
    ttft: dict[str, list[float]] = {name: [] for name in eng_a}
    total: dict[str, list[float]] = {name: [] for name in eng_b}
    for r in range(args.repeats):
        order = list(eng_a) if r % 2 == 0 else list(eng_a)[::-1]
        outs = {}
        for name in order:
            e, t, outs[name] = evicted_prefix(eng_a[name], 1000 + r, args.prefix)
            evict[name].append(e)
            ttft[name].append(t)
        assert len({str(o) for o in outs.values()}) == 1, "the variants' tokens differ"
        outs = {}
        for name in order:
            t, outs[name] = preemption(eng_b[name], 2000 + r, prompt_len, max_tokens)
            total[name].append(t)
        assert len({str(o) for o in outs.values()}) == 1, "the variants' tokens differ"
        print(f"round {r + 1}: " + ", ".join(f"{n}: TTFT {ttft[n][-1] * 1e3:.0f} ms, (b) {total[n][-1]:.2f} s"
                                             for n in order), flush=True)

    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in
           (("evict", evict), ("ttft", ttft), ("total", total))}
    a, b = eng_a["DRAM tier"].stats(), eng_b["DRAM tier"].stats()
    print(f"\n(a) {args.prefix}-token prefix evicted, asked again ({args.repeats} rounds, medians)")
    print("| variant | TTFT of the prefix asked again | evicting request |")
    print("|---|---:|---:|")
    for n in eng_a:
        print(f"| {n} | {med['ttft'][n] * 1e3:.0f} ms | {med['evict'][n] * 1e3:.0f} ms |")
    print(f"TTFT ratio recompute / populate: {med['ttft']['recompute'] / med['ttft']['DRAM tier']:.1f}x; "
          f"DRAM tier: {a.dram_copied} blocks copied, {a.dram_populated} populated, "
          f"prefix hits {a.prefix_hits} vs {eng_a['recompute'].rtc.prefix_hits} tokens")
    print(f"\n(b) 6 x ({prompt_len} + {max_tokens}) tokens in {blocks_b} blocks ({args.repeats} rounds, medians)")
    print("| variant | total | preemptions, all rounds | tokens computed, all rounds |")
    print("|---|---:|---:|---:|")
    for n in eng_b:
        s = eng_b[n].stats()
        print(f"| {n} | {med['total'][n]:.2f} s | {s.preemptions} ({s.swaps} swapped) | {computed[n][0]} |")
    print(f"total ratio recompute / swap: {med['total']['recompute'] / med['total']['DRAM tier']:.2f}x; "
          f"DRAM tier: {b.dram_copied} blocks copied, {b.dram_populated} populated")


if __name__ == "__main__":
    main()
