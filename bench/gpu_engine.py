"""The engine's CUDA/NPU path: exactness of asynchronous scheduling, agreement with the CPU,
and decode speed with and without async scheduling, in one run on a lent accelerator.

Random weights in SmolLM2-135M's shape (the accelerator machines have no model package;
the shapes, not the values, set the speed), seeded, so every engine holds the same model.
1. sync vs async scheduling on the device, float32 and bfloat16: the same tokens for
   greedy, seeded-sampling and stop-token requests of different lengths;
2. the device's float32 logits against the CPU's (plain torch path) for the same steps;
3. decode tokens/s at batch 32 and 64, sync vs async, float32 and bfloat16.

    python bench/gpu_engine.py [--device cuda]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowserve.config import EngineConfig, ModelConfig  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, rope_theta=100000.0, eos_token_ids=[2])


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02
    q, kv, h = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    w = {"embed": rnd(cfg.vocab_size, h), "norm": torch.ones(h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w |= {p + "attn_norm": torch.ones(h), p + "ffn_norm": torch.ones(h), p + "wqkv": rnd(q + 2 * kv, h),
              p + "wo": rnd(h, q), p + "w_gate_up": rnd(2 * cfg.intermediate_size, h),
              p + "w_down": rnd(h, cfg.intermediate_size)}
    return w


def engine(weights, device: str, dtype: str, async_scheduling: bool, batch: int = 64) -> Engine:
    return Engine(None, EngineConfig(device=device, dtype=dtype, async_scheduling=async_scheduling,
                                     max_num_seqs=batch, kv_cache_gb=2.0), weights=(SMOLLM2, weights))


def mixed_requests(n: int = 48):
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randrange(4, 300))] for _ in range(n)]
    params = [SamplingParams(temperature=0 if i % 3 == 0 else 0.8, top_p=0.9, seed=i, max_tokens=rng.randrange(1, 64),
                             stop_token_ids=[rng.randrange(100, 49000) for _ in range(50)], ignore_eos=True)
              for i in range(n)]
    return prompts, params


def decode_rate(e: Engine, batch: int, steps: int = 64) -> float:
    rng = random.Random(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    e.generate([[rng.randrange(100, 49000) for _ in range(128)] for _ in range(batch)],
               SamplingParams(temperature=0, max_tokens=2))  # warm-up at this batch size
    for i in range(batch):
        e.add_request(f"r{batch}-{i}", [rng.randrange(100, 49000) for _ in range(128)], params)
    for _ in range(4):  # the prefills, and the first decodes
        e.step()
    torch.accelerator.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        e.step()
    torch.accelerator.synchronize()
    rate = batch * steps / (time.perf_counter() - t)
    while e.has_work():
        e.step()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    weights = random_weights(SMOLLM2)
    prompts, params = mixed_requests()
    print(f"device: {torch.accelerator.current_accelerator()} {torch.cuda.get_device_name() if args.device == 'cuda' else ''}")

    for dtype in ("float32", "bfloat16"):
        out = {a: engine(weights, args.device, dtype, a).generate(prompts, params) for a in (False, True)}
        same = sum(x == y for x, y in zip(out[False], out[True]))
        print(f"1. {dtype}: async vs sync scheduling, same tokens for {same} of {len(prompts)} requests "
              f"({sum(map(len, out[False]))} tokens)")

    cpu, dev = engine(weights, "cpu", "float32", False), engine(weights, args.device, "float32", False)
    cpu.runner.model.packed, cpu.runner.model.kernels = None, False  # the plain torch reference
    logits = []
    for e in (cpu, dev):
        for i, p in enumerate(prompts[:16]):
            e.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=4))
        logits.append(e.runner.run(e.batcher.schedule())[0].float().cpu())
    err = ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item()
    print(f"2. float32 prefill logits, {args.device} vs CPU: max error {err:.2e} of the logits' scale; "
          f"argmax equal in {int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())} of {len(logits[0])} rows")

    print("3. | dtype | batch | sync tok/s | async tok/s | async / sync |")
    for dtype in ("float32", "bfloat16"):
        es = {a: engine(weights, args.device, dtype, a) for a in (False, True)}
        for batch in (32, 64):
            r = {a: max(decode_rate(es[a], batch) for _ in range(2)) for a in (False, True)}
            print(f"   | {dtype} | {batch} | {r[False]:.0f} | {r[True]:.0f} | {r[True] / r[False]:.2f}x |")


if __name__ == "__main__":
    main()
