"""Where a batch-32 decode step spends its time, and what the model's matmuls can reach.

Three measurements, in one run, on the default model in float32:
1. torch.profiler over decode steps of 32 sequences (128-token prompts, ~170 tokens of
   context): the share of matmuls, the paged-KV gather and the attention bmm;
2. the model's own GEMM shapes at M = 32 rows, with the weights of 30 distinct layers (cold
   in cache, as in a real step) and the output head, in GFLOP/s next to a 2048^3 sgemm;
3. decode attention for one layer, our manual matmul-softmax-matmul vs torch SDPA.

    python bench/profile_step.py
"""
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.offline import matmul_gflops  # noqa: E402
from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.model import attend  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def step_profile(batch: int = 32) -> None:
    engine = Engine(default_model_path(), EngineConfig(max_num_seqs=batch, max_num_batched_tokens=2048,
                                                       kv_cache_gb=1.0))
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(str(i), [rng.randrange(100, 40000) for _ in range(128)],
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(40):  # past the prefills
        engine.step()
    step_s = timed(engine.step)
    with profile() as prof:
        for _ in range(5):
            engine.step()
    total = {e.key: e.self_cpu_time_total / 5 / 1e3 for e in prof.key_averages()}
    print(f"decode step at batch {batch}: {1e3 * step_s:.0f} ms; per step (profiler):")
    for op in ("aten::mm", "aten::index_select", "aten::bmm"):
        print(f"  {op}: {total.get(op, 0):.0f} ms")
    print(f"  everything else: {sum(total.values()) - sum(total.get(op, 0) for op in ('aten::mm', 'aten::index_select', 'aten::bmm')):.0f} ms")


def gemm_rates(m: int = 32) -> None:
    cfg = {"wqkv": (960, 576), "wo": (576, 576), "w_gate_up": (3072, 576), "w_down": (576, 1536)}
    layers = [{k: torch.randn(*shape) for k, shape in cfg.items()} for _ in range(30)]
    xs = {k: torch.randn(m, shape[1]) for k, shape in cfg.items()}
    flops = 30 * sum(2 * m * n * k for n, k in cfg.values())
    layer_s = timed(lambda: [F.linear(xs[k], w) for layer in layers for k, w in layer.items()], 5)
    head, x = torch.randn(49152, 576), torch.randn(m, 576)
    head_s = timed(lambda: F.linear(x, head), 5)
    print(f"sgemm 2048^3: {matmul_gflops():.0f} GFLOP/s; the model's GEMMs at M={m}: 30 layers {flops / layer_s / 1e9:.0f}"
          f" GFLOP/s ({1e3 * layer_s:.0f} ms), output head {2 * m * 49152 * 576 / head_s / 1e9:.0f} GFLOP/s"
          f" ({1e3 * head_s:.0f} ms)")


def attention(batch: int = 32, context: int = 256) -> None:
    q, k, v = torch.randn(3, batch, 3, 64), torch.randn(3, batch, context, 64), torch.randn(3, batch, context, 64)
    mask = (torch.arange(context)[None, :] < torch.randint(150, context, (batch,))[:, None])[None, :, None, :]
    manual = timed(lambda: attend(q, k, v, mask, 64 ** -0.5), 100)
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 100)
    print(f"decode attention, one layer, batch {batch}, context {context}: manual {1e3 * manual:.2f} ms, "
          f"SDPA {1e3 * sdpa:.2f} ms ({manual / sdpa:.2f}x)")


if __name__ == "__main__":
    os.environ.setdefault("DEEPFLOW_CACHE", str(Path(__file__).resolve().parent.parent / ".venv" / "deepflow-cache"))
    step_profile()
    gemm_rates()
    attention()
