"""Offline engine throughput against this machine's float32 matmul roofline.

Runs the FlowServe engine in-process (no server) on the default model: B prompts of 128
random tokens, 128 output tokens each (ignore_eos), for each batch size. In the same run it
measures float32 GEMM GFLOP/s, so the fraction of the roofline is a ratio of two figures
taken side by side. Also times the two weight-load paths (GGUF parse + dequantize, and the
mmap'ed safetensors cache).

    python bench/offline.py [--batches 1,8,32,64] [--threads N] [--out bench/results/offline.json]
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowserve.config import EngineConfig, default_model_path
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams
from flowserve.weights import load_weights


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def read_gbps(mb: int = 1024, reps: int = 5) -> float:
    """DRAM read bandwidth: a sum over a buffer far larger than the caches."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def flops_per_token(cfg) -> float:
    """2 FLOPs per weight used per token: the layers' matmuls plus the output head."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return 2 * (cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size)


def run_batch(engine: Engine, batch: int, prompt_len: int, output_len: int) -> dict:
    rng = random.Random(batch)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [rng.randrange(100, 40000) for _ in range(prompt_len)], params)
    t0 = time.perf_counter()
    decode_steps, decode_time, tokens = 0, 0.0, 0
    while engine.has_work():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        tokens += sum(len(o.token_ids) for o in outs)
        if len(outs) == batch and not engine.batcher.waiting:  # a pure decode step of the full batch
            decode_steps, decode_time = decode_steps + 1, decode_time + dt
    total = time.perf_counter() - t0
    return {"batch": batch, "output_tokens": tokens, "seconds": total, "tokens_per_s": tokens / total,
            "decode_step_ms": 1e3 * decode_time / max(decode_steps, 1),
            "decode_tokens_per_s": batch * decode_steps / decode_time if decode_time else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/offline.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model_path()

    with tempfile.TemporaryDirectory() as cache:  # a cold cache, so both load paths are timed
        os.environ["DEEPFLOW_CACHE"] = cache
        t = time.perf_counter()
        load_weights(model)
        gguf_s = time.perf_counter() - t
        t = time.perf_counter()
        cfg, weights = load_weights(model)
        cached_s = time.perf_counter() - t

        gflops, gbps = matmul_gflops(), read_gbps()
        roofline = gflops * 1e9 / flops_per_token(cfg)
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        max_batch = max(int(b) for b in args.batches.split(","))
        engine = Engine(model, EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=2048,
                                            kv_cache_gb=2.0), weights=(cfg, weights))
        engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        rows = [run_batch(engine, int(b), args.prompt_len, args.output_len) for b in args.batches.split(",")]

    print(f"float32 matmul: {gflops:.1f} GFLOP/s -> roofline {roofline:.0f} tokens/s "
          f"({flops_per_token(cfg) / 1e9:.3f} GFLOP/token), torch threads {torch.get_num_threads()}")
    print(f"DRAM read: {gbps:.1f} GB/s; a decode step streams all {weight_bytes / 1e6:.0f} MB of weights, "
          f"so batch B is also capped at B x {gbps * 1e9 / weight_bytes:.1f} tokens/s")
    print(f"weight load: GGUF {gguf_s:.2f} s, cached safetensors (mmap) {cached_s:.3f} s "
          f"({gguf_s / cached_s:.0f}x faster)")
    print("| batch | output tok/s (incl. prefill) | decode step ms | decode tok/s | % of matmul roofline "
          "| % of min(matmul, bandwidth) roofline |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bound = min(roofline, r["batch"] * gbps * 1e9 / weight_bytes)
        r["roofline_fraction"] = r["decode_tokens_per_s"] / roofline
        r["bound_fraction"] = r["decode_tokens_per_s"] / bound
        print(f"| {r['batch']} | {r['tokens_per_s']:.1f} | {r['decode_step_ms']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {100 * r['roofline_fraction']:.0f}% | "
              f"{100 * r['bound_fraction']:.0f}% |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"matmul_gflops": gflops, "roofline_tokens_per_s": roofline,
                                          "dram_read_gbps": gbps, "weight_bytes": weight_bytes,
                                          "load_gguf_s": gguf_s, "load_cached_s": cached_s,
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
