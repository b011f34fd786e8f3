"""LoRA in one engine: decode throughput of 32 rows spread over 8 adapters against 32 rows on
the base, same engine, runs alternated; and an adapter's load times (disk -> host memory,
host memory -> a device slot).

Adapters are written here in PEFT's format (random A and B, rank `--rank`, all seven target
modules), so peft is not needed.

    .venv/bin/python bench/lora.py [--rows 32] [--adapters 8] [--rank 8] [--steps 32] [--device auto]
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowserve.config import EngineConfig, default_model_path  # noqa: E402
from flowserve.engine import Engine  # noqa: E402
from flowserve.lora import MODULES, module_shape, read_lora  # noqa: E402
from flowserve.lora_slots import load_lora  # noqa: E402
from flowserve.protocol import Adapter, SamplingParams  # noqa: E402


def write_adapter(path: Path, cfg, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for m in MODULES:
            out, inp = module_shape(cfg, m)
            kind = "self_attn" if m[0] in "qkvo" else "mlp"
            key = f"base_model.model.model.layers.{i}.{kind}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none"}))


def decode_tokens_per_s(eng: Engine, prompts: list[list[int]], adapters: list, steps: int,
                        params: SamplingParams | None = None) -> float:
    """Prefill all rows (each with its adapter, or None), then time `steps` steps in which
    every row decodes (greedy unless `params` says otherwise)."""
    params = params or SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        eng.add_request(f"r{i}", p, params, adapter=a)
    while any(seq.num_computed < seq.num_prompt for seq in eng.seqs.values()):
        eng.step()
    eng.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    eng.wait()
    rate = len(prompts) * steps / (time.perf_counter() - t0)
    for rid in list(eng.seqs):
        eng.abort(rid)
    while eng.has_work():
        eng.step()
    return rate


def alternated(eng: Engine, prompts: list[list[int]], params: dict[str, SamplingParams], steps: int,
               runs: int) -> dict[str, float]:
    """Median decode tokens/s of `prompts` (no adapter) under each of `params`, their runs
    alternated so that the machine's drift weighs on all alike."""
    rates: dict[str, list[float]] = {name: [] for name in params}
    for _ in range(runs):
        for name, p in params.items():
            rates[name].append(decode_tokens_per_s(eng, prompts, [None] * len(prompts), steps, p))
    return {name: statistics.median(r) for name, r in rates.items()}


def sampling_bench(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Engine, list[list[int]]]:
    """What the one-engine sampling benchmarks (bench/logprobs.py, bench/structured.py) share:
    their common flags parsed (after `ap`'s own), the engine, and `--rows` seeded random prompts."""
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    eng = Engine(default_model_path(), EngineConfig(device=args.device, num_kv_blocks=1024, max_num_seqs=args.rows))
    rng = random.Random(0)
    return args, eng, [[rng.randrange(100, 20000) for _ in range(32)] for _ in range(args.rows)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    eng = Engine(default_model_path(), EngineConfig(device=args.device, kv_cache_gb=0.25, max_loras=args.adapters))
    cfg = eng.model_cfg
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(args.adapters):
            path = Path(tmp) / f"lora{i}"
            write_adapter(path, cfg, args.rank, i)
            adapters.append(Adapter(path.name, str(path), read_lora(str(path), cfg, eng.cfg.max_lora_rank).digest))

        # load times: disk -> host memory (read, check, fuse), host memory -> a slot
        t0 = time.perf_counter()
        weights = load_lora(adapters[0], cfg, eng.cfg.max_lora_rank, eng.dtype)
        disk_ms = 1e3 * (time.perf_counter() - t0)
        eng.runner.load_lora(0, adapters[0], weights)  # the first load allocates the stacks
        slot_ms = []
        for _ in range(20):
            eng.wait()
            t0 = time.perf_counter()
            eng.runner.load_lora(0, adapters[0], weights)
            eng.wait()
            slot_ms.append(1e3 * (time.perf_counter() - t0))
        nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
        print(f"rank-{args.rank} adapter ({nbytes / 2**20:.1f} MiB fused, {eng.dtype}) on {eng.device}: "
              f"disk -> host {disk_ms:.1f} ms, host -> slot median {statistics.median(slot_ms):.2f} ms")

        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(100, cfg.vocab_size, (48,), generator=g).tolist() for _ in range(args.rows)]
        mixed = [adapters[i % args.adapters] for i in range(args.rows)]
        decode_tokens_per_s(eng, prompts[:4], [None] * 4, 2)  # warm-up: kernels, the stacks' sizes
        decode_tokens_per_s(eng, prompts[:4], mixed[:4], 2)
        base, lora = [], []
        for _ in range(args.repeats):  # alternated, so drift in the machine's load hits both alike
            base.append(decode_tokens_per_s(eng, prompts, [None] * args.rows, args.steps))
            lora.append(decode_tokens_per_s(eng, prompts, mixed, args.steps))
        b, m = statistics.median(base), statistics.median(lora)
        print(f"{args.rows} decode rows, {eng.device}: base {b:.0f} tokens/s, over {args.adapters} adapters "
              f"{m:.0f} tokens/s: {m / b:.2f}x (runs: base {[round(x) for x in base]}, "
              f"lora {[round(x) for x in lora]})")


if __name__ == "__main__":
    main()
