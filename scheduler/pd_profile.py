"""`python deepflow.py profile-pd`: measure this machine's PD heatmap (scheduler/pd_policy.py).

Two clusters of the same size run side by side in this process: two colocated TEs, and a
prefill TE plus a decode TE (KV over DistFlow). For each cell of the grid (prompt length ×
decode/prefill ratio) both get the same batch of requests, as the paper profiles it:
`burst` concurrent requests of the cell's shape (fresh random prompts, so no prefix-cache
hits; greedy decoding to exactly the cell's decode length), one cluster right after the
other, and the mean job completion time of each is recorded. The heatmap is saved as JSON
(serve reads it) and printed as a table; `--show` prints a saved one.
"""
import argparse
import asyncio
import os
import random
import time

from flowserve.config import EngineConfig, add_flags, default_model_path, from_args
from flowserve.protocol import FinishReason, SamplingParams
from scaling.node import local_host
from scheduler.cluster import Cluster
from scheduler.job import Task
from scheduler.pd_policy import Heatmap


async def burst_jct_ms(cluster: Cluster, prompt_len: int, output_len: int, burst: int, rng: random.Random) -> float:
    """Mean completion time of `burst` requests submitted together."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    tasks = [Task("profile", i, [rng.randrange(100, 40000) for _ in range(prompt_len)], params) for i in range(burst)]

    async def run(task: Task) -> float:
        t0 = time.perf_counter()
        cluster.submit(task)
        while not (ev := await task.events.get()).finish_reason:
            pass
        if ev.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"profile request failed: {ev.error}")
        return time.perf_counter() - t0

    return 1e3 * sum(await asyncio.gather(*(run(t) for t in tasks))) / burst


async def profile(args: argparse.Namespace) -> Heatmap:
    model = args.model or default_model_path()
    cfg = from_args(EngineConfig, args)  # the engine settings serve would run with
    colocated = Cluster(model, {"colocated": (2, cfg)}, [local_host(model)])  # two TEs either way: half the cores each
    disagg = Cluster(model, {"prefill": (1, cfg), "decode": (1, cfg)}, [local_host(model)],
                     kv_transport=args.kv_transport)
    rng = random.Random(0)
    try:
        for c in (colocated, disagg):
            await c.start()
        table_c, table_d = [[] for _ in args.prefill_lens], [[] for _ in args.prefill_lens]
        for i, p in enumerate(args.prefill_lens):
            for r in args.ratios:
                d = max(1, round(p * r))
                table_c[i].append(await burst_jct_ms(colocated, p, d, args.burst, rng))
                table_d[i].append(await burst_jct_ms(disagg, p, d, args.burst, rng))
                print(f"prefill {p:5d}  decode {d:4d}: colocated {table_c[i][-1]:8.0f} ms  "
                      f"disaggregated {table_d[i][-1]:8.0f} ms", flush=True)
    finally:
        for c in (colocated, disagg):
            await c.shutdown()
    setup = (f"setup: bursts of {args.burst} requests; colocated = 2 colocated TEs, disaggregated = 1 prefill + "
             f"1 decode TE ({args.kv_transport}); {max(1, (os.cpu_count() or 1) // 2)} thread(s) per TE, "
             f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    return Heatmap(list(args.prefill_lens), list(args.ratios), table_c, table_d, setup)


def add_profile_parser(sub, default_path) -> None:
    pp = sub.add_parser("profile-pd", help="measure the colocated vs disaggregated heatmap of this machine")
    pp.add_argument("--model", help="GGUF file or HF directory (default: packaged SmolLM2-135M-Instruct)")
    pp.add_argument("--out", default=None, help="where to save it (default: where serve looks)")
    pp.add_argument("--show", action="store_true", help="print the saved heatmap and exit")
    pp.add_argument("--prefill-lens", type=int, nargs="+", default=[128, 512, 1024])
    pp.add_argument("--ratios", type=float, nargs="+", default=[1 / 32, 1 / 8, 1 / 2],
                    help="decode tokens per prompt token")
    pp.add_argument("--burst", type=int, default=4, help="concurrent requests per measurement")
    pp.add_argument("--kv-transport", choices=["unix", "tcp"], default="unix")
    add_flags(pp, EngineConfig, skip=("num_threads",))  # threads: each TE gets half the cores

    def run(args: argparse.Namespace) -> None:
        path = args.out or default_path()
        if args.show:
            if not os.path.exists(path):
                raise SystemExit(f"no PD heatmap at {path}: run `python deepflow.py profile-pd` first")
            print(Heatmap.load(path).table())
            return
        heatmap = asyncio.run(profile(args))
        heatmap.save(path)
        print(f"\n{heatmap.table()}\nsaved to {path}")
    pp.set_defaults(func=run)
