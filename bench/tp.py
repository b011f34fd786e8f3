"""Tensor parallelism on this machine: TP=1 against TP=3 for SmolLM2-135M (flowserve/tp.py).

1. allreduce: the collectives of a TP=3 step alone: three forked processes, one thread
   each, gloo over loopback as the executors use it, all-reducing [T, hidden] float32, 61
   times per step (the embedding, then two per layer); median per call and per step.
2. decode: in-process engines, TP=1 (this process, with --threads threads, and with one)
   and TP=3 (three spawned executors sharing --threads, at least one each), interleaved,
   --repeats times: decode tokens/s at each batch size (the prefill step left out); medians.
3. start: `deepflow.py serve --tensor-parallel-size 3` by start mode (and TP=1 forked, for
   reference): the TE's five-step timeline; for fork, a second TP TE too (the template
   made the shards' packed linears for the first). Then, after one request, the memory of
   the TE's processes from /proc/<pid>/smaps_rollup: RSS, PSS (shared pages split among
   their sharers) and private, per process, against the whole model (weights + packed).

    python bench/tp.py [--parts allreduce,decode,start] [--batches 1,16] [--repeats 3]
                       [--modes fork,preloaded,peer,cold] [--out bench/results/tp.json]
"""
import argparse
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.server_util import Server, children, wait_until  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_scaling", ROOT / "bench" / "scaling.py")
bench_scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_scaling)
STEPS, smaps = bench_scaling.STEPS, bench_scaling.smaps
COLLECTIVES_PER_STEP = 61  # Llama.reduce: the embedding, and after wo and w_down in each of 30 layers


def allreduce(rows: list[int], world: int = 3, hidden: int = 576, calls: int = 300) -> list[dict]:
    """Median µs of one all-reduce of [T, hidden] float32 among `world` forked processes."""
    import torch
    import torch.distributed as dist
    listener = socket.create_server(("127.0.0.1", 0))
    read, write = os.pipe()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # as an executor: one thread, gloo over loopback, rank 0 serving the store
            torch.set_num_threads(1)
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], world, rank == 0, wait_for_workers=False,
                                  master_listen_fd=listener.fileno() if rank == 0 else None)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
            out = []
            for t in rows:
                x = torch.ones(t, hidden)
                times = []
                for i in range(calls + 20):
                    t0 = time.perf_counter()
                    dist.all_reduce(x)
                    if i >= 20:
                        times.append(time.perf_counter() - t0)
                out.append({"rows": t, "us_per_call": 1e6 * statistics.median(times)})
            if rank == 0:
                os.write(write, json.dumps(out).encode())
            os._exit(0)
        pids.append(pid)
    listener.close()
    os.close(write)
    result = json.loads(os.read(read, 1 << 16))
    for pid in pids:
        os.waitpid(pid, 0)
    for r in result:
        r["ms_per_step"] = COLLECTIVES_PER_STEP * r["us_per_call"] / 1e3
    return result


def decode(batches: list[int], repeats: int, threads: int, new_tokens: int = 32) -> list[dict]:
    """Decode tokens/s of TP=1 with `threads` threads and with one, and of TP=3 (its
    executors share `threads`, at least one each), interleaved; medians over `repeats`."""
    import random

    from flowserve.config import EngineConfig, default_model_path
    from flowserve.engine import Engine
    from flowserve.protocol import SamplingParams
    model = default_model_path()
    tp1, tp3 = (Engine(model, EngineConfig(kv_cache_gb=0.5, num_threads=threads, tensor_parallel_size=tp))
                for tp in (1, 3))
    variants = {f"TP=1, {threads} threads": (tp1, threads), "TP=1, 1 thread": (tp1, 1), "TP=3": (tp3, threads)}
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    rng = random.Random(0)
    for eng in (tp1, tp3):  # the first step of each shape creates its oneDNN primitives
        for batch in batches:
            eng.generate([[rng.randrange(100, 40000) for _ in range(64)] for _ in range(batch)], params)
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for batch in batches:
            prompts = [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(batch)]
            for name, (eng, n) in variants.items():  # interleaved: all see the same load from other processes
                eng.set_threads(n)
                for i, p in enumerate(prompts):
                    eng.add_request(f"r{i}", p, params)
                eng.step()  # every prefill, and the first tokens
                t0, tokens = time.perf_counter(), 0
                while eng.has_work():
                    tokens += sum(len(o.token_ids) for o in eng.step())
                rates.setdefault((name, batch), []).append(tokens / (time.perf_counter() - t0))
    tp3.runner.close()
    return [{"batch": b, **{name: statistics.median(rates[name, b]) for name in variants}} for b in batches]


def memory(s: Server, te: dict, tp: int) -> list[dict]:
    """smaps of a TE's master and its executors (and the template), MB."""
    pids = [("master" if tp > 1 else "TE", te["pid"])] + [(f"executor {i}", p)
                                                          for i, p in enumerate(sorted(children(te["pid"])))]
    template = s.get("/admin/cluster")["template_pid"]
    out = []
    for name, pid in pids + ([("template", template)] if template else []):
        m = smaps(pid)
        out.append({"process": name, "rss_mb": m["Rss"] / 1024, "pss_mb": m["Pss"] / 1024,
                    "private_mb": (m["Private_Clean"] + m["Private_Dirty"]) / 1024,
                    "shared_mb": (m["Shared_Clean"] + m["Shared_Dirty"]) / 1024})
    return out


def start(mode: str, tp: int) -> dict:
    """A server whose one TE starts by `mode` (a second one too for fork and peer): timelines, memory."""
    s = Server("--start-mode", mode, "--tensor-parallel-size", str(tp), "--max-model-len", "512",
               "--kv-cache-gb", "0.3", timeout=600)
    try:
        s.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        [te] = s.get("/admin/cluster")["tes"]
        row = {"mode": mode, "tp": tp, "timeline_ms": te["timeline_ms"], "memory": memory(s, te, tp)}
        if mode in ("fork", "peer"):  # a second TE: fork reuses the shards' packed linears; peer streams weights
            s.post("/admin/scale", {"group": "colocated", "instances": 2})
            wait_until(lambda: sum(t["state"] == "ready" for t in s.get("/admin/cluster")["tes"]) == 2, 600)
            second = next(t for t in s.get("/admin/cluster")["tes"] if t["id"] != te["id"])
            row["second"] = {"start_mode": second["start_mode"], "timeline_ms": second["timeline_ms"]}
        return row
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="allreduce,decode,start")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--modes", default="fork,preloaded,peer,cold")
    ap.add_argument("--out", default="bench/results/tp.json")
    args = ap.parse_args()
    os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
    results: dict = {"cores": len(os.sched_getaffinity(0))}
    if "allreduce" in args.parts:  # first: it forks, which this process may do before torch computes
        results["allreduce"] = allreduce([1, 16, 512])
        print("| rows | all-reduce (µs, median) | x61 per step (ms) |\n|---:|---:|---:|")
        for r in results["allreduce"]:
            print(f"| {r['rows']} | {r['us_per_call']:.0f} | {r['ms_per_step']:.1f} |")
    if "decode" in args.parts:
        results["decode"] = rows = decode([int(b) for b in args.batches.split(",")], args.repeats, args.threads)
        names = [k for k in rows[0] if k != "batch"]
        print("\n| batch | " + " | ".join(f"{n} (tok/s)" for n in names) + " | TP=3 / best TP=1 | TP=3 step (ms) |")
        print("|---:|" + "---:|" * (len(names) + 2))
        for r in rows:
            best = max(r[n] for n in names if n.startswith("TP=1"))
            print(f"| {r['batch']} | " + " | ".join(f"{r[n]:.1f}" for n in names) +
                  f" | {r['TP=3'] / best:.2f} | {1e3 * r['batch'] / r['TP=3']:.0f} |")
    if "start" in args.parts:
        rows = [start("fork", 1)] + [start(m, 3) for m in args.modes.split(",")]
        results["start"] = rows
        print("\n| TE | " + " | ".join(STEPS) + " | total |\n|---|" + "---:|" * (len(STEPS) + 1))
        for r in rows:
            for label, t in [(f"TP={r['tp']} {r['mode']}", r["timeline_ms"])] + (
                    [(f"TP={r['tp']} {r['mode']}, 2nd TE ({r['second']['start_mode']})", r["second"]["timeline_ms"])]
                    if "second" in r else []):
                print(f"| {label} | " + " | ".join(f"{t[k]:.0f}" for k in STEPS) + f" | {t['total']:.0f} |")
        print("\n| TE | process | RSS (MB) | PSS (MB) | private (MB) | shared (MB) |\n|---|---|---:|---:|---:|---:|")
        for r in rows:
            for m in r["memory"]:
                print(f"| TP={r['tp']} {r['mode']} | {m['process']} | {m['rss_mb']:.0f} | {m['pss_mb']:.0f} | "
                      f"{m['private_mb']:.0f} | {m['shared_mb']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
