"""Where a batch-32 decode step spends its time, and what the model's matmuls can reach.

Three measurements, in one run, on the default model in float32:
1. torch.profiler over decode steps of 32 sequences (128-token prompts, ~170 tokens of
   context) of the default engine: the ops that take the time;
2. the model's own GEMM shapes, with the weights of 30 distinct layers (cold in cache, as
   in a real step) and the output head, at M = 32 and 2048 rows, in GFLOP/s next to a
   2048^3 sgemm: MKL on the plain layout against oneDNN on the packed one (the engine's
   `Llama.linear` picks by row count);
3. decode attention for one layer, batch 32, 150-450 tokens of context: the reference
   (gather the blocks, then matmuls) against flowserve/kernels.cpp, at 1 and 2 threads.

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
from flowserve import kernels  # noqa: E402
from flowserve.model import attend, gather_blocks, pack_linears  # noqa: E402
from flowserve.protocol import SamplingParams  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def step_profile(batch: int = 32) -> None:
    engine = Engine(default_model_path(), EngineConfig(max_num_seqs=batch, kv_cache_gb=1.0))
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
    ops = sorted(((e.self_cpu_time_total / 5 / 1e3, e.key) for e in prof.key_averages()), reverse=True)
    print(f"decode step at batch {batch}: {1e3 * step_s:.0f} ms; per step (profiler):")
    for ms, op in ops[:4]:
        print(f"  {op}: {ms:.1f} ms")
    print(f"  everything else: {sum(ms for ms, _ in ops[4:]):.1f} ms")


def gemm_rates() -> None:
    cfg = {"wqkv": (960, 576), "wo": (576, 576), "w_gate_up": (3072, 576), "w_down": (576, 1536)}
    layers = [{k: torch.randn(*shape) for k, shape in cfg.items()} for _ in range(30)]
    packed = [pack_linears(layer) for layer in layers]
    head = torch.randn(49152, 576)
    head_packed = pack_linears({"h": head})["h"]
    onednn = (lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    print(f"sgemm 2048^3: {matmul_gflops():.0f} GFLOP/s")
    for m in (32, 2048):
        xs = {k: torch.randn(m, shape[1]) for k, shape in cfg.items()}
        flops = 30 * sum(2 * m * n * k for n, k in cfg.values())
        x = torch.randn(m, 576)
        for name, lin, ws, hw in (("MKL, plain", F.linear, layers, head), ("oneDNN, packed", onednn, packed, head_packed)):
            layer_s = timed(lambda: [lin(xs[k], w[k]) for w in ws for k in cfg], 3)
            head_s = timed(lambda: lin(x, hw), 3)
            print(f"M={m} {name}: 30 layers {flops / layer_s / 1e9:.0f} GFLOP/s ({1e3 * layer_s:.0f} ms), "
                  f"output head {2 * m * 49152 * 576 / head_s / 1e9:.0f} GFLOP/s ({1e3 * head_s:.1f} ms)")


def attention(batch: int = 32, num_blocks: int = 2048, block_size: int = 16) -> None:
    k_cache, v_cache = torch.randn(3, num_blocks, block_size, 64), torch.randn(3, num_blocks, block_size, 64)
    lens = torch.randint(150, 450, (batch,))
    width = -(-int(lens.max()) // block_size)
    tables = torch.randperm(num_blocks)[:batch * width].view(batch, width)
    q, out = torch.randn(batch, 9, 64), torch.empty(batch, 9, 64)

    def reference():
        k, v = gather_blocks(k_cache, tables), gather_blocks(v_cache, tables)
        mask = torch.arange(k.shape[2])[None, :] < lens[:, None]
        return attend(q.view(batch, 3, 3, 64).transpose(0, 1), k, v, mask[None, :, None, :], 64 ** -0.5)

    def kernel():
        torch.ops.deepflow.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, 64 ** -0.5)
    threads = torch.get_num_threads()
    for n in (1, threads):
        torch.set_num_threads(n)
        ref, ker = timed(reference, 50), timed(kernel, 50)
        print(f"decode attention, one layer, batch {batch}, 150-450 tokens, {n} thread(s): gather + matmuls "
              f"{1e3 * ref:.2f} ms, kernel {1e3 * ker:.2f} ms ({ref / ker:.1f}x)")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    os.environ.setdefault("DEEPFLOW_CACHE", str(Path(__file__).resolve().parent.parent / ".venv" / "deepflow-cache"))
    step_profile()
    gemm_rates()
    if kernels.available():
        attention()
