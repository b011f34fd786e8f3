"""Each speed lever of the float32 CPU step on its own, against the plain torch engine, in
one run (issue 13's lever table).

Engines differ only in their levers, share the weights, and take turns (`--reps` rounds)
on the same work: a batch of `--batch` random 128-token prompts, then decode steps of the
whole batch. Reported per lever: decode tokens/s of the full batch, its fraction of this
machine's float32 matmul roofline (bench/offline.py), prefill tokens/s, and the ratios to
the plain engine, best of the rounds (the machine is shared: the best round is the least
disturbed one). Also the default with asynchronous scheduling, which on the CPU has
nothing to overlap (the forward runs in the calling thread). Last, `--dtype bfloat16` beside the float32 default: its speed, and how
many of ten chat prompts get the same greedy answer (48 tokens) as in float32.

    python bench/levers.py [--batch 32] [--reps 3]
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.offline import flops_per_token, matmul_gflops, run_batch  # noqa: E402
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402
from flowserve.tokenizer import Tokenizer  # noqa: E402
from flowserve.weights import load_weights  # noqa: E402


def prefill_rate(engine: Engine, seed: int, prompts: int = 8, length: int = 256) -> float:
    """Prompt tokens/s of `prompts` new random prompts computed together (one output token each)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rng = random.Random(seed)  # prompts never seen before: no prefix-cache hit
    ids = [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(prompts)]
    t = time.perf_counter()
    engine.generate(ids, params)
    return prompts * length / (time.perf_counter() - t)


QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 7?",
             "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
             "Give me a synonym for happy.", "How many legs does a spider have?",
             "Translate 'good morning' into Spanish.", "What is the boiling point of water in Celsius?"]


def agreement(model: str, a: Engine, b: Engine) -> int:
    """How many of QUESTIONS get the same greedy answer from engines a and b."""
    tok = Tokenizer.load(model)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=48)
    return sum(x == y for x, y in zip(a.generate(prompts, params), b.generate(prompts, params)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/levers.json")
    args = ap.parse_args()
    model = default_model_path()
    cfg, weights = load_weights(model)
    ecfg = dict(max_num_seqs=args.batch, max_num_batched_tokens=2048, kv_cache_gb=1.0)
    engines = {name: Engine(model, EngineConfig(cpu_kernels=name != "plain torch", **ecfg), weights=(cfg, weights))
               for name in ("plain torch", "oneDNN-packed linears", "C++ kernels, fused prefill attention", "both")}
    engines["both + async scheduling"] = Engine(model, EngineConfig(async_scheduling=True, **ecfg),
                                                weights=(cfg, weights))
    engines["bfloat16 (--dtype)"] = Engine(model, EngineConfig(dtype="bfloat16", **ecfg))
    engines["oneDNN-packed linears"].runner.model.kernels = False
    engines["C++ kernels, fused prefill attention"].runner.model.packed = None
    for e in engines.values():
        e.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    best: dict[str, dict] = {name: {"decode_tokens_per_s": 0.0, "prefill_tokens_per_s": 0.0} for name in engines}
    for rep in range(args.reps):
        for name, e in engines.items():
            r = run_batch(e, args.batch, 128, args.output_len)
            b = best[name]
            b["decode_tokens_per_s"] = max(b["decode_tokens_per_s"], r["decode_tokens_per_s"])
            b["prefill_tokens_per_s"] = max(b["prefill_tokens_per_s"], prefill_rate(e, seed=rep))
    gflops = matmul_gflops()
    roofline = gflops * 1e9 / flops_per_token(cfg)
    base = best["plain torch"]
    print(f"float32 matmul {gflops:.0f} GFLOP/s -> roofline {roofline:.0f} tokens/s; "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}, best of {args.reps}")
    print("| lever | decode tok/s | % of roofline | vs plain | prefill tok/s | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, b in best.items():
        b["roofline_fraction"] = b["decode_tokens_per_s"] / roofline
        print(f"| {name} | {b['decode_tokens_per_s']:.0f} | {100 * b['roofline_fraction']:.0f}% | "
              f"{b['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x | {b['prefill_tokens_per_s']:.0f} | "
              f"{b['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x |")
    agree = agreement(model, engines["both"], engines["bfloat16 (--dtype)"])
    print(f"bfloat16 vs float32: {agree} of {len(QUESTIONS)} chat prompts get the same greedy answer")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"matmul_gflops": gflops, "roofline_tokens_per_s": roofline,
                                          "batch": args.batch, "levers": best,
                                          "bfloat16_agreement": [agree, len(QUESTIONS)]}, indent=2))


if __name__ == "__main__":
    main()
